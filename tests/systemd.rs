//! `systemd/deployra-builder.service` under a real systemd: each test boots
//! a Debian container with systemd as PID 1 (`local/debian-systemd`, from
//! testbed/debian-images), installs the binary and the unit with the
//! commands README.md gives, and drives it with `systemctl` while the
//! builder talks to the test bed (host network, the Engine's socket mounted).
//!
//! What is checked is what an operator sees: `systemctl start` returning
//! once the builder is ready, `systemctl status`, the journal, a stop that
//! drains, restarts after a crash and after a hang (the watchdog), and no
//! restart loop on a configuration error.

mod common;

use std::process::{Command, Output};

use common::{wait_until, Builder, Dashboard, FixtureRepo, Job, Testbed};

const IMAGE: &str = "local/debian-systemd:bookworm";
const UNIT: &str = "deployra-builder";

/// A container booted with systemd, holding one installed builder.
struct Host {
    container: String,
    queue: String,
}

impl Host {
    /// Boots the container and installs the builder as README.md says,
    /// with the test bed's settings plus `env` (a value of "" removes the
    /// setting) and, when given, a drop-in for the unit. The unit is not
    /// started.
    async fn install(bed: &Testbed, env: &[(&str, &str)], drop_in: Option<&str>) -> Host {
        let container = bed.unique("deployra-systemd");
        let socket_gid = run(Command::new("stat").args(["-c", "%g", "/var/run/docker.sock"]));
        let out = Command::new("docker")
            .args(["run", "-d", "--name", &container])
            // What systemd needs to run as PID 1 and to set up the unit's
            // sandbox (mount namespaces, capability sets). --privileged would
            // also ask for CAP_SYS_RESOURCE, which this machine does not have.
            .args(["--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE"])
            .args(["--security-opt", "seccomp=unconfined", "--cgroupns=private"])
            .args(["--tmpfs", "/run", "--tmpfs", "/run/lock"])
            .args(["--network", "host", "-v", "/var/run/docker.sock:/var/run/docker.sock"])
            .arg(IMAGE)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot boot {IMAGE} (run testbed/debian-images): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let host = Host {
            container,
            queue: bed.unique("systemd-queue"),
        };
        wait_until("systemd in the container has booted", || {
            let state = host.exec(&["systemctl", "is-system-running"]);
            matches!(String::from_utf8_lossy(&state.stdout).trim(), "running" | "degraded")
        })
        .await;

        let mut settings: Vec<(String, String)> = bed
            .daemon_env()
            .into_iter()
            // The test bed's own paths mean nothing inside the container: the
            // unit's defaults apply (work in its private /tmp, pack on PATH).
            .filter(|(k, _)| k != "WORK_DIR" && k != "PACK_BIN")
            .collect();
        settings.push(("REDIS_QUEUE_NAME".to_owned(), host.queue.clone()));
        settings.push(("WORKER_ID".to_owned(), host.container.clone()));
        settings.push(("LOG_LEVEL".to_owned(), "info".to_owned()));
        for (k, v) in env {
            settings.retain(|(name, _)| name != k);
            if !v.is_empty() {
                settings.push(((*k).to_owned(), (*v).to_owned()));
            }
        }
        let staging = tempfile::tempdir().unwrap();
        let env_file = staging.path().join("env");
        let lines: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        std::fs::write(&env_file, lines.join("\n") + "\n").unwrap();
        host.copy_in(env!("CARGO_BIN_EXE_deployra-builder"), "/root/deployra-builder");
        host.copy_in(
            concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/deployra-builder.service"),
            "/root/deployra-builder.service",
        );
        host.copy_in(env_file.to_str().unwrap(), "/root/env");

        // The host's Docker package made the docker group; here it is made
        // with the mounted socket's group id.
        host.sh(&format!("groupadd --system --gid {socket_gid} docker"));
        // README.md, "Install and run under systemd".
        host.sh("install -m 0755 /root/deployra-builder /usr/local/bin/ \
             && useradd --system --home-dir /var/lib/deployra-builder --groups docker deployra \
             && install -d -m 0750 /etc/deployra-builder \
             && install -m 0640 /root/env /etc/deployra-builder/env \
             && install -m 0644 /root/deployra-builder.service /etc/systemd/system/");
        if let Some(drop_in) = drop_in {
            let dir = format!("/etc/systemd/system/{UNIT}.service.d");
            let file = staging.path().join("test.conf");
            std::fs::write(&file, drop_in).unwrap();
            host.sh(&format!("mkdir -p {dir}"));
            host.copy_in(file.to_str().unwrap(), &format!("{dir}/test.conf"));
        }
        host.sh("systemctl daemon-reload");
        host
    }

    fn exec(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(["exec", &self.container])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs a shell command in the container; it must succeed.
    fn sh(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-c", script]);
        assert!(
            out.status.success(),
            "`{script}` failed in {}: {}{}\njournal:\n{}",
            self.container,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn copy_in(&self, from: &str, to: &str) {
        run(Command::new("docker").args(["cp", from, &format!("{}:{to}", self.container)]));
    }

    /// A property of the unit, as `systemctl show` gives it.
    fn show(&self, property: &str) -> String {
        self.sh(&format!("systemctl show --property={property} --value {UNIT}"))
            .trim()
            .to_owned()
    }

    fn journal(&self) -> String {
        let out = self.exec(&["journalctl", "--no-pager", "-u", UNIT]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Builder for Host {
    /// A unit that failed for good, not one waiting to be restarted.
    fn exited(&mut self) -> Option<String> {
        (self.show("ActiveState") == "failed").then(|| format!("unit failed: {}", self.show("Result")))
    }

    fn output(&self) -> String {
        self.journal()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.container]).output();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A repository whose build takes a few seconds, so that there is time to
/// look at the unit while it runs.
fn slow_repo(bed: &Testbed, seconds: u32) -> FixtureRepo {
    let repo = bed.new_repo("systemd");
    repo.write(
        "Dockerfile",
        &format!("FROM local/busybox:latest\nRUN sleep {seconds}\nCOPY . /app\n"),
    );
    repo.write("hello.txt", "built under systemd\n");
    repo.commit("slow build");
    repo
}

/// Queues a job whose build takes `seconds`, and waits until `systemctl
/// status` names it: the build is running.
async fn queue_running_build(bed: &Testbed, host: &Host, seconds: u32) -> Job {
    let job = bed.job(&slow_repo(bed, seconds), serde_json::json!({}));
    bed.rpush(&host.queue, &job.payload()).await;
    wait_until(&format!("systemctl status names {}", job.deployment_id), || {
        host.show("StatusText").contains(&job.deployment_id)
    })
    .await;
    job
}

fn assert_builded(dash: &Dashboard) {
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{}", dash.everything());
}

#[tokio::test(flavor = "multi_thread")]
async fn starts_when_ready_builds_and_shows_its_status() {
    let bed = Testbed::load();
    // Pings every second are needed to survive; the build takes longer.
    let mut host = Host::install(&bed, &[], Some("[Service]\nWatchdogSec=2\n")).await;
    host.sh(&format!("systemctl enable --now {UNIT}"));

    // Type=notify: once `systemctl start` has returned, the builder is ready.
    assert_eq!(host.show("ActiveState"), "active");
    assert_eq!(host.show("SubState"), "running");
    assert_eq!(host.show("StatusText"), "idle");
    // One stamp per line, journald's: the builder's own line starts at its level.
    let journal = host.journal();
    let ready = journal
        .lines()
        .find(|l| l.contains("deployra-builder ready"))
        .unwrap_or_else(|| panic!("no ready line:\n{journal}"));
    let message = ready.split_once("]: ").map(|(_, m)| m.trim_start());
    assert!(
        message.is_some_and(|m| m.starts_with("INFO deployra-builder ready")),
        "{ready}"
    );
    let pid = host.show("MainPID");
    let user = host.sh(&format!("stat -c %U /proc/{pid}"));
    assert_eq!(user.trim(), "deployra");

    let job = queue_running_build(&bed, &host, 4).await;
    assert!(
        host.show("StatusText").starts_with("building 1: "),
        "{}",
        host.show("StatusText")
    );
    let dash = bed.wait_final(&job.deployment_id, &mut host).await;
    assert_builded(&dash);
    wait_until("the status is back to idle", || host.show("StatusText") == "idle").await;

    // The watchdog was fed all along, so systemd never stepped in.
    assert_eq!(host.show("NRestarts"), "0", "{}", host.journal());
    let journal = host.journal();
    assert!(
        journal
            .lines()
            .any(|l| l.contains(&job.deployment_id) && l.contains("job builded")),
        "{journal}"
    );
    for secret in [
        bed.get("API_KEY"),
        bed.get("AWS_SECRET_ACCESS_KEY"),
        bed.get("TESTBED_GIT_PASSWORD"),
    ] {
        assert!(!journal.contains(secret), "a secret reached the journal:\n{journal}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_lets_the_running_build_finish() {
    let bed = Testbed::load();
    let mut host = Host::install(&bed, &[], None).await;
    host.sh(&format!("systemctl start {UNIT}"));
    let job = queue_running_build(&bed, &host, 3).await;

    // `systemctl stop` returns when the builder has exited.
    host.sh(&format!("systemctl stop {UNIT}"));
    let calls = bed.calls(&job.deployment_id).await;
    assert!(
        calls.iter().any(|c| c["body"]["status"] == "BUILDED"),
        "not BUILDED when `systemctl stop` returned: {calls:#?}"
    );
    assert_builded(&bed.wait_final(&job.deployment_id, &mut host).await);
    assert_eq!(host.show("ActiveState"), "inactive");
    assert_eq!(host.show("Result"), "success");
    assert!(host.journal().contains("worker stopped"), "{}", host.journal());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configuration_error_fails_the_unit_without_a_restart_loop() {
    let bed = Testbed::load();
    let host = Host::install(&bed, &[("REDIS_PORT", "sixty")], None).await;
    let start = host.exec(&["systemctl", "start", UNIT]);
    assert!(!start.status.success(), "the unit started with REDIS_PORT=sixty");

    // Failed for good: a restartable exit would leave it "activating",
    // waiting for its next start.
    assert_eq!(host.show("ActiveState"), "failed");
    assert_eq!(host.show("ExecMainStatus"), "78");
    assert_eq!(host.show("NRestarts"), "0");
    let journal = host.journal();
    assert!(
        journal.contains(r#"configuration error: REDIS_PORT: "sixty" is not a valid number"#),
        "{journal}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_builder_is_restarted_and_builds_its_job() {
    let bed = Testbed::load();
    let mut host = Host::install(&bed, &[], None).await;
    host.sh(&format!("systemctl start {UNIT}"));
    let job = queue_running_build(&bed, &host, 3).await;

    host.sh(&format!("systemctl kill --signal=SIGKILL {UNIT}"));
    let dash = bed.wait_final(&job.deployment_id, &mut host).await;
    assert_eq!(host.show("NRestarts"), "1", "{}", host.journal());
    // Started twice, built once.
    let statuses = dash.statuses();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("BUILDED"),
        "{}",
        dash.everything()
    );
    assert_eq!(statuses.iter().filter(|s| *s == "BUILDED").count(), 1, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_builder_is_killed_by_the_watchdog_and_restarted() {
    let bed = Testbed::load();
    let mut host = Host::install(&bed, &[], Some("[Service]\nWatchdogSec=2\n")).await;
    host.sh(&format!("systemctl start {UNIT}"));
    let pid = host.show("MainPID");

    // A stopped process sends no pings, and ignores the watchdog's SIGABRT
    // until the unit's TimeoutAbortSec ends it with SIGKILL.
    host.sh(&format!("kill -STOP {pid}"));
    wait_until("systemd restarts the hung builder", || {
        host.show("NRestarts") == "1" && host.show("ActiveState") == "active"
    })
    .await;
    assert_ne!(host.show("MainPID"), pid);
    assert!(host.journal().contains("Watchdog timeout"), "{}", host.journal());

    // The new process builds.
    let repo = slow_repo(&bed, 0);
    let job = bed.job(&repo, serde_json::json!({}));
    bed.rpush(&host.queue, &job.payload()).await;
    assert_builded(&bed.wait_final(&job.deployment_id, &mut host).await);
}
