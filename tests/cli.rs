//! The command line a person uses: `check` says what is wrong, `enqueue`
//! writes a job the daemon builds, `build` builds a directory locally.
//! Real binary, real test bed.

mod common;

use std::process::{Command, Output, Stdio};

use common::Testbed;

/// Runs the binary with the test bed's environment (and nothing else from
/// the test's), plus `extra`, in a directory without a `.env`.
fn cli(bed: &Testbed, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_deployra-builder"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .args(args);
    for (k, v) in bed.daemon_env() {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().expect("cannot run deployra-builder")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_passes_against_the_test_bed() {
    let bed = Testbed::load();
    let out = cli(&bed, &["check"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("FAIL"), "{}", text(&out));
    // PACK_BIN is the test bed's stand-in, which reports this version.
    assert!(text(&out).contains("ok   pack 0.0.0+fake-pack ("), "{}", text(&out));
}

#[test]
fn check_says_how_to_install_a_missing_pack() {
    let bed = Testbed::load();
    let out = cli(&bed, &["check"], &[("PACK_BIN", "/nonexistent/pack")]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let line = all
        .lines()
        .find(|l| l.starts_with("FAIL pack (/nonexistent/pack)"))
        .unwrap_or_else(|| panic!("no FAIL line for pack:\n{all}"));
    assert!(line.contains("install it from https://buildpacks.io/"), "{line}");
    assert!(line.contains("repositories that have no Dockerfile fail"), "{line}");
}

#[test]
fn check_names_a_wrong_api_key_without_printing_it() {
    let bed = Testbed::load();
    let out = cli(&bed, &["check"], &[("API_KEY", "not-the-key-1234")]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let line = all
        .lines()
        .find(|l| l.starts_with("FAIL dashboard"))
        .unwrap_or_else(|| panic!("no FAIL line for the dashboard:\n{all}"));
    assert!(line.contains("API_KEY"), "{line}");
    assert!(!all.contains("not-the-key-1234"), "{all}");
    assert!(all.contains("ok   redis"), "{all}");
}

#[test]
fn check_names_an_unreachable_redis() {
    let bed = Testbed::load();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    let out = cli(&bed, &["check"], &[("REDIS_PORT", &port)]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let line = all
        .lines()
        .find(|l| l.starts_with("FAIL redis"))
        .unwrap_or_else(|| panic!("no FAIL line for Redis:\n{all}"));
    assert!(line.contains(&port) && line.contains("Redis"), "{line}");
}

#[test]
fn check_reports_a_bad_setting_as_a_configuration_error() {
    let bed = Testbed::load();
    let out = cli(&bed, &["check"], &[("REDIS_PORT", "sixty")]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("REDIS_PORT"), "{}", text(&out));
    // A number too large to mean anything stops the daemon the same way;
    // it once panicked (exit 101) or retried a lock forever.
    for timeout in ["18446744073709551615", "9300000000000000"] {
        let out = cli(&bed, &["run"], &[("BUILD_TIMEOUT_SECS", timeout)]);
        assert_eq!(out.status.code(), Some(78), "{}", text(&out));
        assert!(
            text(&out).contains("BUILD_TIMEOUT_SECS") && text(&out).contains("out of range: 1 to 604800"),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn enqueue_refuses_an_invalid_job_naming_the_flag() {
    let bed = Testbed::load();
    let queue = bed.unique("cli-queue");
    let out = cli(
        &bed,
        &["enqueue", "--repo", "acme/web", "--branch", "main", "--env", "1BAD=x"],
        &[("REDIS_QUEUE_NAME", &queue), ("GITHUB_TOKEN", "t")],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("--env"), "{}", text(&out));
}

#[tokio::test]
async fn an_enqueued_job_is_built_by_the_daemon() {
    let bed = Testbed::load();
    let repo = bed.new_repo("cli");
    repo.write("Dockerfile", "FROM local/busybox:latest\nRUN echo enqueued-by-cli\n");
    repo.commit("initial");
    let mut daemon = bed.start_daemon(&[]);
    let out = cli(
        &bed,
        &[
            "enqueue",
            "--repo",
            &repo.name,
            "--branch",
            "main",
            "--provider",
            "custom",
        ],
        &[
            ("REDIS_QUEUE_NAME", &daemon.queue),
            ("GIT_URL", bed.get("TESTBED_GIT_URL")),
            ("GIT_USERNAME", bed.get("TESTBED_GIT_USERNAME")),
            ("GIT_PASSWORD", bed.get("TESTBED_GIT_PASSWORD")),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let deployment_id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(deployment_id.starts_with("cli-"), "{deployment_id:?}");
    let dashboard = bed.wait_final(&deployment_id, &mut daemon).await;
    assert_eq!(dashboard.statuses().last().map(String::as_str), Some("BUILDED"));
    assert!(dashboard.everything().contains("enqueued-by-cli"));
}

#[test]
fn build_builds_a_local_directory() {
    let bed = Testbed::load();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM local/busybox:latest\nRUN echo cli-build-output\n",
    )
    .unwrap();
    let tag = format!("{}:latest", bed.unique("cli-local"));
    let out = cli(&bed, &["build", dir.path().to_str().unwrap(), "--tag", &tag], &[]);
    let exists = Command::new("docker")
        .args(["image", "inspect", &tag])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("cli-build-output"), "{all}");
    assert!(all.contains("==> build done"), "{all}");
    assert!(exists, "image {tag} was not created:\n{all}");
}

#[test]
fn build_fails_with_the_error_line() {
    let bed = Testbed::load();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM local/busybox:latest\nRUN exit 3\n").unwrap();
    let tag = format!("{}:latest", bed.unique("cli-fail"));
    let out = cli(&bed, &["build", dir.path().to_str().unwrap(), "--tag", &tag], &[]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("build failed"), "{all}");
}
