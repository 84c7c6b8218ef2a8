//! End to end: the real daemon takes jobs from Redis and builds them with
//! the real Docker Engine, pushes to the registry answering as ECR, creates
//! the repository in moto and reports to the recording dashboard.

mod common;

use common::Testbed;
use serde_json::json;

const LIFECYCLE_POLICY: &str = r#"{"rules":[{"rulePriority":1,"description":"Keep only 1 image","selection":{"tagStatus":"any","countType":"imageCountMoreThan","countNumber":1},"action":{"type":"expire"}}]}"#;

/// A Dockerfile whose output the tests look for. Each call gives a RUN line
/// of its own (a shell comment), so no layer cached by another build can
/// hide the output.
fn dockerfile(tb: &Testbed) -> String {
    format!(
        "FROM local/busybox:latest
RUN echo first-output-line && echo second-output-line && echo third-output-line # {}
COPY . /app
CMD [\"cat\", \"/app/message.txt\"]
",
        tb.unique("run")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn branch_tip_is_built_pushed_and_reported() {
    let tb = Testbed::load();
    let repo = tb.new_repo("tip");
    repo.write("Dockerfile", &dockerfile(&tb))
        .write("message.txt", "hello from the tip\n");
    let sha = repo.commit("first");
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;

    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    let checked_out = format!("Checked out commit {sha}");
    // Each step's name, its output, its end, in order: the classic
    // builder's wording, or BuildKit's plain progress (CMD is no step there).
    let steps: &[&str] = if tb.classic() {
        &[
            "Step 1/4 : FROM local/busybox:latest",
            "Step 2/4 : RUN echo first-output-line",
            "first-output-line",
            "second-output-line",
            "third-output-line",
            "Step 3/4 : COPY . /app",
            "Successfully built",
        ]
    } else {
        &[
            "[1/3] FROM docker.io/local/busybox:latest",
            "[2/3] RUN echo first-output-line",
            "first-output-line",
            "second-output-line",
            "third-output-line",
            " DONE ",
            "[3/3] COPY . /app",
            " DONE ",
            "writing image sha256:",
        ]
    };
    let mut expected = vec!["Starting build of", checked_out.as_str()];
    expected.extend(steps);
    expected.extend(["Successfully tagged", "Image pushed:"]);
    dash.assert_in_order(&expected);
    assert!(dash.calls.iter().all(|c| c["apiKeyOk"] == true && c["answered"] == 200));

    let host = tb.get("TESTBED_REGISTRY_HOST");
    let repository = format!("deployra/{}", job.service_id);
    let data = &dash.final_status()["data"];
    assert_eq!(data["containerRegistryType"], "ecr");
    let uri = data["containerImageUri"].as_str().unwrap();
    let digest = uri
        .strip_prefix(&format!("{host}/{repository}@"))
        .unwrap_or_else(|| panic!("image URI {uri} is not pinned to a digest in {host}/{repository}"));
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");

    // The registry holds that manifest, under the commit and `latest`.
    let manifest = tb.registry_get(&format!("{repository}/manifests/{digest}")).await;
    assert_eq!(manifest.status(), 200);
    let tags: serde_json::Value = tb
        .registry_get(&format!("{repository}/tags/list"))
        .await
        .json()
        .await
        .unwrap();
    let mut tags: Vec<&str> = tags["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort();
    assert_eq!(tags, [sha.as_str(), "latest"]);

    // moto holds the repository with the keep-one lifecycle policy.
    let ecr = tb.ecr().await;
    let policy = ecr
        .get_lifecycle_policy()
        .repository_name(&repository)
        .send()
        .await
        .expect("repository or lifecycle policy missing in ECR");
    let got: serde_json::Value = serde_json::from_str(policy.lifecycle_policy_text().unwrap()).unwrap();
    assert_eq!(
        got,
        serde_json::from_str::<serde_json::Value>(LIFECYCLE_POLICY).unwrap()
    );

    // The image runs and holds the checkout.
    assert_eq!(tb.read_file_in_image(uri, "/app/message.txt"), "hello from the tip\n");

    // Nothing is left behind: no work directory, no local tags.
    let leftovers: Vec<_> = std::fs::read_dir(daemon.work_dir()).unwrap().collect();
    assert!(leftovers.is_empty(), "work dir not cleaned: {leftovers:?}");
    let local = std::process::Command::new("docker")
        .args(["image", "ls", "-q", &format!("{host}/{repository}")])
        .output()
        .unwrap();
    assert!(
        local.stdout.is_empty(),
        "local tags left: {}",
        String::from_utf8_lossy(&local.stdout)
    );

    // The git password reached neither the dashboard nor the journal.
    let password = tb.get("TESTBED_GIT_PASSWORD");
    assert!(!dash.everything().contains(password));
    assert!(!daemon.output().contains(password));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_that_is_not_the_tip_is_built_exactly() {
    let tb = Testbed::load();
    let repo = tb.new_repo("non-tip");
    repo.write("Dockerfile", &dockerfile(&tb))
        .write("message.txt", "old commit\n");
    let old = repo.commit("old");
    repo.write("message.txt", "new tip\n");
    let tip = repo.commit("tip");
    assert_ne!(old, tip);

    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({ "commitSha": old }));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    dash.assert_in_order(&[&format!("Checked out commit {old}")]);
    let uri = dash.final_status()["data"]["containerImageUri"].as_str().unwrap();
    assert_eq!(tb.read_file_in_image(uri, "/app/message.txt"), "old commit\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_file_path_selects_a_dockerfile_in_a_subdirectory() {
    let tb = Testbed::load();
    let repo = tb.new_repo("subdir");
    repo.write(
        "Dockerfile",
        "FROM local/busybox:latest\nRUN echo wrong-dockerfile && exit 1\n",
    )
    .write(
        "docker/Dockerfile.prod",
        "FROM local/busybox:latest\nCOPY docker/marker.txt /marker.txt\nRUN echo from-the-prod-dockerfile\n",
    )
    .write("docker/marker.txt", "prod marker\n");
    repo.commit("two dockerfiles");
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({ "runtimeFilePath": "docker/Dockerfile.prod" }));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    dash.assert_in_order(&["from-the-prod-dockerfile"]);
    assert!(!dash.log_lines().iter().any(|l| l.contains("wrong-dockerfile")));
    let uri = dash.final_status()["data"]["containerImageUri"].as_str().unwrap();
    assert_eq!(tb.read_file_in_image(uri, "/marker.txt"), "prod marker\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_step_is_reported_and_the_next_job_still_builds() {
    let tb = Testbed::load();
    let broken = tb.new_repo("failing");
    broken
        .write(
            "Dockerfile",
            "FROM local/busybox:latest\nRUN echo output-before-failure && exit 3\nRUN echo never-reached\n",
        )
        .commit("broken");
    let good = tb.new_repo("after-failure");
    good.write("Dockerfile", &dockerfile(&tb))
        .write("message.txt", "fine\n")
        .commit("good");

    let mut daemon = tb.start_daemon(&[]);
    let failing = tb.job(&broken, json!({}));
    let next = tb.job(&good, json!({}));
    tb.rpush(&daemon.queue, &failing.payload()).await;
    tb.rpush(&daemon.queue, &next.payload()).await;

    let dash = tb.wait_final(&failing.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "FAILED"], "{:#?}", dash.calls);
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(error.starts_with("build: "), "{error}");
    let step = if tb.classic() {
        "Step 2/3 : RUN echo output-before-failure"
    } else {
        "[2/3] RUN echo output-before-failure"
    };
    let exit = tb.exit_code_text(3);
    assert!(error.contains(step), "{error}");
    assert!(error.contains(&exit), "{error}");
    assert!(!error.contains('\n'));
    dash.assert_in_order(&[step, "output-before-failure", &exit]);
    assert!(!dash.log_lines().iter().any(|l| l.contains("never-reached")));

    let dash = tb.wait_final(&next.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_git_credentials_fail_clearly_without_leaking() {
    let tb = Testbed::load();
    let repo = tb.new_repo("auth");
    repo.write("Dockerfile", &dockerfile(&tb))
        .write("message.txt", "x\n")
        .commit("c");
    let wrong = "wrong-password-Zq81xv";
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({ "gitProvider": tb.custom_provider(wrong) }));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "FAILED"], "{:#?}", dash.calls);
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(error.starts_with("clone: authentication"), "{error}");
    assert!(error.contains(&repo.name), "{error}");
    let right = tb.get("TESTBED_GIT_PASSWORD");
    for secret in [wrong, right] {
        assert!(!dash.everything().contains(secret), "{secret} reached the dashboard");
        assert!(!daemon.output().contains(secret), "{secret} reached the journal");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unroutable_payloads_are_dead_lettered_and_bad_fields_fail_by_name() {
    let tb = Testbed::load();
    let repo = tb.new_repo("after-garbage");
    repo.write("Dockerfile", &dockerfile(&tb))
        .write("message.txt", "ok\n")
        .commit("c");
    let mut daemon = tb.start_daemon(&[]);
    let invalid = tb.job(&repo, json!({ "runtimeFilePath": "../../etc/passwd" }));
    let good = tb.job(&repo, json!({}));
    // `..` would be a dot segment of every report's URL.
    let dot_segment = invalid.payload().replacen(&invalid.deployment_id, "..", 1);
    for payload in ["this is not json", r#"{"serviceId":"svc"}"#, &dot_segment] {
        tb.rpush(&daemon.queue, payload).await;
    }
    // Bytes that are no UTF-8 text at all.
    let mut conn = tb.redis().await;
    let _: i64 = redis::cmd("RPUSH")
        .arg(&daemon.queue)
        .arg(&b"{\"deploymentId\": \"\xff\xfe\"}"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    tb.rpush(&daemon.queue, &invalid.payload()).await;
    tb.rpush(&daemon.queue, &good.payload()).await;

    let dash = tb.wait_final(&invalid.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["FAILED"], "{:#?}", dash.calls);
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(error.contains("runtimeFilePath"), "{error}");

    let dash = tb.wait_final(&good.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"]);

    let dead = tb.lrange(&format!("{}:dead", daemon.queue)).await;
    let dead: Vec<serde_json::Value> = dead.iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(dead.len(), 4, "{dead:#?}");
    assert_eq!(dead[0]["payload"], "this is not json");
    assert!(dead[0]["reason"].as_str().unwrap().starts_with("not JSON"));
    assert_eq!(dead[1]["reason"], "deploymentId: missing");
    assert!(
        dead[2]["reason"].as_str().unwrap().contains(r#"not "." or "..""#),
        "{dead:#?}"
    );
    assert_eq!(dead[3]["reason"], "not UTF-8 text, so not a JSON job", "{dead:#?}");
    assert_eq!(dead[3]["payload"], "{\"deploymentId\": \"\u{fffd}\u{fffd}\"}");
    let processing = format!("{}:processing:{}", daemon.queue, daemon.worker_id);
    assert!(
        tb.lrange(&processing).await.is_empty(),
        "an entry stayed in {processing}"
    );
    assert!(tb.lrange(&daemon.queue).await.is_empty());
}
