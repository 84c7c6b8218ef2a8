//! Dockerfiles that only BuildKit builds, built by the daemon's default
//! builder, and the classic builder still there as a setting. Each fixture
//! would fail under the classic builder; each asserts what the user sees.

mod common;

use common::Testbed;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn chmod_copies_cache_mounts_and_bind_mounts_work() {
    let tb = Testbed::load();
    let repo = tb.new_repo("bk-mounts");
    let cache_id = tb.unique("cache");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM local/busybox:latest
COPY --chmod=755 greet.sh /usr/local/bin/greet.sh
RUN greet.sh
RUN --mount=type=cache,id={cache_id},target=/cache echo written-into-the-cache > /cache/note
RUN --mount=type=cache,id={cache_id},target=/cache echo \"read back: $(cat /cache/note)\"
RUN test ! -e /cache/note && echo the-cache-stays-out-of-the-image
RUN --mount=type=bind,source=bound.txt,target=/mnt/bound.txt echo \"bound: $(cat /mnt/bound.txt)\"
RUN test ! -e /mnt/bound.txt && echo the-bound-file-stays-out-of-the-image
"
        ),
    )
    // Committed without the executable bit: only --chmod makes it runnable.
    .write("greet.sh", "#!/bin/sh\necho greeting-from-a-chmod-copy\n")
    .write("bound.txt", "bind-mount-content\n")
    .commit("buildkit only");
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    dash.assert_in_order(&[
        "COPY --chmod=755 greet.sh",
        "greeting-from-a-chmod-copy",
        "read back: written-into-the-cache",
        "the-cache-stays-out-of-the-image",
        "bound: bind-mount-content",
        "the-bound-file-stays-out-of-the-image",
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_variable_is_a_build_secret_that_stays_out_of_the_image_and_the_logs() {
    let tb = Testbed::load();
    let value = format!("postgres://app:pw-{}@db.internal/app", tb.unique("s"));
    let repo = tb.new_repo("bk-secret");
    repo.write(
        "Dockerfile",
        "FROM local/busybox:latest
RUN --mount=type=secret,id=DATABASE_URL echo \"secret read, shouted: $(tr a-z A-Z < /run/secrets/DATABASE_URL)\"
RUN --mount=type=secret,id=DATABASE_URL cp /run/secrets/DATABASE_URL /tmp/copy && wc -c < /tmp/copy > /secret-length && rm /tmp/copy
RUN test ! -e /run/secrets/DATABASE_URL && echo the-secret-is-gone-after-its-step
",
    )
    .commit("secret");
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(
        &repo,
        json!({ "environmentVariables": [{"key": "DATABASE_URL", "value": value}] }),
    );
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    // The step read the value: its upper-case form is no secret to mask.
    dash.assert_in_order(&[
        &format!("secret read, shouted: {}", value.to_uppercase()),
        "the-secret-is-gone-after-its-step",
    ]);
    let uri = dash.final_status()["data"]["containerImageUri"].as_str().unwrap();
    assert_eq!(
        tb.read_file_in_image(uri, "/secret-length").trim(),
        value.len().to_string()
    );

    assert!(!dash.everything().contains(&value), "the secret reached the dashboard");
    assert!(!daemon.output().contains(&value), "the secret reached the journal");
    let image = tb.image_contents(uri);
    assert!(
        !image.windows(value.len()).any(|w| w == value.as_bytes()),
        "the secret is in the image's history, config or layers"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_stage_the_image_does_not_use_is_skipped() {
    let tb = Testbed::load();
    let repo = tb.new_repo("bk-stages");
    let marker = tb.unique("stage");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM local/busybox:latest AS unused
RUN echo unused-stage-ran && exit 9
FROM local/busybox:latest AS deps
RUN echo deps-{marker} > /deps.txt
FROM local/busybox:latest
COPY --from=deps /deps.txt /deps.txt
RUN cat /deps.txt
"
        ),
    )
    .commit("stages");
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    assert!(
        !dash.everything().contains("unused-stage-ran"),
        "the unused stage ran:\n{}",
        dash.log_lines().join("\n")
    );
    let uri = dash.final_status()["data"]["containerImageUri"].as_str().unwrap();
    assert_eq!(tb.read_file_in_image(uri, "/deps.txt"), format!("deps-{marker}\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn another_services_image_in_ecr_cannot_be_a_base_image() {
    let tb = Testbed::load();
    let mut daemon = tb.start_daemon(&[]);

    // The victim: a service whose image is in the registry.
    let victim_repo = tb.new_repo("bk-victim");
    victim_repo
        .write("Dockerfile", "FROM local/busybox:latest\nCOPY secret.txt /secret.txt\n")
        .write("secret.txt", "the victim's data\n")
        .commit("victim");
    let victim = tb.job(&victim_repo, json!({}));
    tb.rpush(&daemon.queue, &victim.payload()).await;
    let dash = tb.wait_final(&victim.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);

    // Another tenant names it as a base image.
    let host = tb.get("TESTBED_REGISTRY_HOST");
    let attacker_repo = tb.new_repo("bk-attacker");
    attacker_repo
        .write(
            "Dockerfile",
            &format!(
                "FROM {host}/deployra/{}:latest\nRUN cat /secret.txt\n",
                victim.service_id
            ),
        )
        .commit("attacker");
    let attacker = tb.job(&attacker_repo, json!({}));
    tb.rpush(&daemon.queue, &attacker.payload()).await;
    let dash = tb.wait_final(&attacker.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "FAILED"], "{:#?}", dash.calls);
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(error.contains(&victim.service_id), "{error}");
    assert!(!dash.everything().contains("the victim's data"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_classic_builder_is_a_setting() {
    let tb = Testbed::load();
    let repo = tb.new_repo("bk-classic");
    let marker = tb.unique("classic");
    repo.write(
        "Dockerfile",
        &format!("FROM local/busybox:latest\nRUN echo classic-{marker}\n"),
    )
    .commit("classic");
    let mut daemon = tb.start_daemon(&[("DOCKER_BUILDER", "classic")]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    dash.assert_in_order(&[
        "Step 1/2 : FROM local/busybox:latest",
        &format!("Step 2/2 : RUN echo classic-{marker}"),
        &format!("classic-{marker}"),
        "Successfully built",
    ]);
}
