//! Layer reuse across builds of a service: on the same host through the
//! kept image, on a fresh host through the registry's last image, and
//! nothing at all with BUILD_CACHE off. Correctness first: every build's
//! image holds its own commit's files.

mod common;

use common::{Daemon, FixtureRepo, Testbed};
use serde_json::json;

/// The dependency step is slow and prints a marker; reusing it from cache
/// shows as "Using cache" right after its step line (classic builder) or
/// as `#N CACHED` for its step number (BuildKit), and no marker output.
const DOCKERFILE: &str = "FROM local/busybox:latest
COPY deps.txt /deps.txt
RUN echo installing-dependencies && sleep 3 && cp /deps.txt /installed.txt
COPY src/ /app/src/
COPY .env /app/.env
";

fn fixture(tb: &Testbed) -> FixtureRepo {
    let repo = tb.new_repo("cache");
    // Unique dependencies: no other test's layers can match ours.
    repo.write("Dockerfile", DOCKERFILE)
        .write("deps.txt", &format!("deps {}\n", tb.unique("d")))
        .write("src/main.txt", "version 1\n");
    repo
}

struct Build {
    dependency_step_cached: bool,
    image: String,
}

async fn build(tb: &Testbed, daemon: &mut Daemon, repo: &FixtureRepo, service_id: &str, env_value: &str) -> Build {
    let mut job = tb.job(
        repo,
        json!({ "environmentVariables": [{"key": "APP_MODE", "value": env_value}] }),
    );
    job.json["serviceId"] = json!(service_id);
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    let lines = dash.log_lines();
    let step = lines
        .iter()
        .position(|l| l.contains("RUN echo installing-dependencies"))
        .expect("dependency step missing from the log");
    let ran = lines.iter().any(|l| l.trim() == "installing-dependencies");
    let cached = if tb.classic() {
        lines[step + 1].contains("Using cache")
    } else {
        let number = lines[step].split_whitespace().next().unwrap();
        lines.contains(&format!("{number} CACHED"))
    };
    assert_ne!(
        ran,
        cached,
        "the step either ran or came from cache:\n{}",
        lines.join("\n")
    );
    Build {
        dependency_step_cached: cached,
        image: dash.final_status()["data"]["containerImageUri"]
            .as_str()
            .unwrap()
            .to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_reuses_layers_on_the_same_host_and_from_the_registry() {
    let tb = Testbed::load();
    let repo = fixture(&tb);
    repo.commit("v1");
    let service = tb.unique("svc-cache");
    let mut daemon = tb.start_daemon(&[]);

    let first = build(&tb, &mut daemon, &repo, &service, "one").await;
    assert!(!first.dependency_step_cached, "nothing to reuse on the first build");

    // A source change: the dependency layer is reused, the sources are new.
    repo.write("src/main.txt", "version 2\n");
    repo.commit("v2");
    let second = build(&tb, &mut daemon, &repo, &service, "one").await;
    assert!(
        second.dependency_step_cached,
        "the second build should reuse the dependency layer"
    );
    assert_eq!(tb.read_file_in_image(&second.image, "/app/src/main.txt"), "version 2\n");

    // Under BuildKit no image of the service stays on the Engine, where
    // another service's FROM could name it: its layers are in BuildKit's
    // cache only.
    let kept = format!("deployra-cache/{service}:latest");
    if !tb.classic() {
        assert_eq!(
            local_images(&format!("deployra-cache/{service}")),
            "",
            "a cache image was kept"
        );
    }

    // A fresh host: a new builder process, no local image of the service
    // and no build cache (this binary's other test never expects a cached
    // step).
    if tb.classic() {
        let removed = std::process::Command::new("docker")
            .args(["rmi", &kept])
            .output()
            .unwrap();
        assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    }
    let pruned = std::process::Command::new("docker")
        .args(["builder", "prune", "--all", "--force"])
        .output()
        .unwrap();
    assert!(pruned.status.success(), "{}", String::from_utf8_lossy(&pruned.stderr));
    drop(daemon);
    let mut daemon = tb.start_daemon(&[]);
    repo.write("src/main.txt", "version 3\n");
    repo.commit("v3");
    let third = build(&tb, &mut daemon, &repo, &service, "two").await;
    assert!(
        third.dependency_step_cached,
        "the registry's last image should provide the layer"
    );
    assert_eq!(tb.read_file_in_image(&third.image, "/app/src/main.txt"), "version 3\n");
    // The .env change was picked up, not served from cache.
    let dotenv = tb.read_file_in_image(&third.image, "/app/.env");
    assert_eq!(dotenv.trim(), "APP_MODE='two'");

    // A change to what the dependency step depends on rebuilds it.
    repo.write("deps.txt", &format!("deps {}\n", tb.unique("changed")));
    repo.commit("v4");
    let fourth = build(&tb, &mut daemon, &repo, &service, "two").await;
    assert!(!fourth.dependency_step_cached, "changed dependencies must be rebuilt");
    let _ = std::process::Command::new("docker").args(["rmi", &kept]).output();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_build_cache_off_nothing_is_reused() {
    let tb = Testbed::load();
    let repo = fixture(&tb);
    repo.commit("v1");
    let service = tb.unique("svc-nocache");
    let mut daemon = tb.start_daemon(&[("BUILD_CACHE", "off")]);
    let first = build(&tb, &mut daemon, &repo, &service, "x").await;
    assert!(!first.dependency_step_cached);
    let second = build(&tb, &mut daemon, &repo, &service, "x").await;
    assert!(!second.dependency_step_cached, "BUILD_CACHE=off must not reuse layers");
    assert_eq!(
        local_images(&format!("deployra-cache/{service}")),
        "",
        "no cache image is kept with BUILD_CACHE=off"
    );
}

/// The ids of the Engine's images named `repository`, one a line.
fn local_images(repository: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["image", "ls", "-q", repository])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}
