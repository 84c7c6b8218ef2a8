//! Dockerfiles that only BuildKit builds, built by the daemon's default
//! builder, and the classic builder still there as a setting. Each fixture
//! would fail under the classic builder; each asserts what the user sees.

mod common;

use common::{docker_with_config, Testbed};
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
RUN greet.sh # {cache_id}
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
    // A secret is no input of BuildKit's cache key: the steps carry a
    // marker of this run so that none comes from an earlier run's cache.
    let run = tb.unique("run");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM local/busybox:latest
RUN --mount=type=secret,id=DATABASE_URL echo \"secret read, shouted: $(tr a-z A-Z < /run/secrets/DATABASE_URL)\" # {run}
RUN --mount=type=secret,id=DATABASE_URL cp /run/secrets/DATABASE_URL /tmp/copy && wc -c < /tmp/copy > /secret-length && rm /tmp/copy
RUN test ! -e /run/secrets/DATABASE_URL && echo the-secret-is-gone-after-its-step
"
        ),
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
    // Refused for want of credentials (not for TLS or a missing image):
    // the builder's ECR token was not offered.
    assert!(error.contains("401 Unauthorized"), "{error}");
    assert!(!dash.everything().contains("the victim's data"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_base_image_is_pulled_with_the_operators_docker_login() {
    let tb = Testbed::load();
    let host = tb.get("TESTBED_PRIVATE_REGISTRY_HOST");
    let base = format!("{host}/private/base:{}", tb.unique("b"));
    // The operator's login, as `docker login` writes it; the base image is
    // pushed with it and is not on the Engine afterwards.
    let docker_config = tempfile::tempdir().unwrap();
    let docker = |args: &[&str]| {
        docker_with_config(docker_config.path(), args);
    };
    docker(&[
        "login",
        "-u",
        tb.get("TESTBED_PRIVATE_REGISTRY_USERNAME"),
        "-p",
        tb.get("TESTBED_PRIVATE_REGISTRY_PASSWORD"),
        host,
    ]);
    docker(&["tag", "local/busybox:latest", &base]);
    docker(&["push", &base]);
    docker(&["rmi", &base]);

    let repo = tb.new_repo("bk-private-base");
    repo.write(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo built-on-the-private-base\n"),
    )
    .commit("private base");
    let config_dir = docker_config.path().to_str().unwrap();
    let mut with_login = tb.start_daemon(&[("DOCKER_CONFIG", config_dir)]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&with_login.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut with_login).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    dash.assert_in_order(&["built-on-the-private-base"]);
    let password = tb.get("TESTBED_PRIVATE_REGISTRY_PASSWORD");
    assert!(!dash.everything().contains(password));
    assert!(!with_login.output().contains(password));

    // Without the login the same build cannot pull its base: the login
    // above is what made it work.
    let _ = std::process::Command::new("docker").args(["rmi", &base]).output();
    let empty = tempfile::tempdir().unwrap();
    let mut without = tb.start_daemon(&[("DOCKER_CONFIG", empty.path().to_str().unwrap())]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&without.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut without).await;
    assert_eq!(dash.statuses(), ["BUILDING", "FAILED"], "{:#?}", dash.calls);
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(error.contains(&base) && error.contains("401 Unauthorized"), "{error}");
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

#[tokio::test(flavor = "multi_thread")]
async fn an_engine_that_refuses_buildkit_gets_classic_builds_and_one_warning() {
    let tb = Testbed::load();
    // The test bed's Engine behind a relay that answers /session with 404.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("engine.sock");
    let mut relay = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/no-buildkit-engine"))
        .arg(&socket)
        .spawn()
        .expect("cannot start testbed/no-buildkit-engine");
    common::wait_until("the relay listens", || socket.exists()).await;

    let docker_host = format!("unix://{}", socket.display());
    let mut daemon = tb.start_daemon(&[("DOCKER_HOST", &docker_host)]);
    let mut jobs = Vec::new();
    for n in 0..2 {
        let repo = tb.new_repo("bk-refused");
        let marker = tb.unique("refused");
        repo.write(
            "Dockerfile",
            &format!("FROM local/busybox:latest\nRUN echo build-{n}-{marker}\n"),
        )
        .commit("c");
        let job = tb.job(&repo, json!({}));
        tb.rpush(&daemon.queue, &job.payload()).await;
        jobs.push((job, marker));
    }
    for (n, (job, marker)) in jobs.iter().enumerate() {
        let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
        assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
        let wanted = format!("build-{n}-{marker}");
        let mut expected = vec![];
        if n == 0 {
            expected.push("This Docker Engine does not offer BuildKit; building with the classic builder");
        }
        expected.extend([
            "Step 1/2 : FROM local/busybox:latest",
            wanted.as_str(),
            "Successfully built",
        ]);
        dash.assert_in_order(&expected);
    }
    let warnings = daemon
        .output()
        .matches("the Docker Engine refused a BuildKit session; building with the classic builder from now on")
        .count();
    assert_eq!(warnings, 1, "{}", daemon.output());
    relay.kill().unwrap();
    relay.wait().unwrap();
}
