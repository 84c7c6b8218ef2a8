//! The test bed, seen from a test: the services `testbed/up` started (real
//! Redis, Docker Engine, registry answering as ECR, moto, git smart HTTP,
//! recording dashboard), fixture repositories, and the real daemon binary.
//!
//! Every test gets its own queue, worker id, work directory, repository and
//! deployment ids, so tests run in parallel without seeing each other.

#![allow(dead_code)] // each test binary uses its own subset of the helpers

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a test waits for an event before failing. Generous: the
/// machines are shared and builds are real.
pub const WAIT: Duration = Duration::from_secs(300);

pub struct Testbed {
    env: HashMap<String, String>,
}

impl Testbed {
    pub fn load() -> Testbed {
        let state = std::env::var("TESTBED_STATE").unwrap_or_else(|_| "/var/lib/deployra-testbed".to_owned());
        let path = Path::new(&state).join("env");
        let mut env = dotenvy::from_path_iter(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; start the test bed with ./testbed/up", path.display()))
            .collect::<Result<HashMap<_, _>, _>>()
            .expect("test bed env file is malformed");
        // `DOCKER_BUILDER=classic ./testbed/test ...` runs the tests against
        // the classic builder (`.ci/run` does for the pipeline tests).
        if let Ok(builder) = std::env::var("DOCKER_BUILDER") {
            env.insert("DOCKER_BUILDER".to_owned(), builder);
        }
        Testbed { env }
    }

    /// Whether the daemons under test build with the classic builder
    /// rather than BuildKit: the output's wording differs.
    pub fn classic(&self) -> bool {
        self.env.get("DOCKER_BUILDER").is_some_and(|b| b == "classic")
    }

    /// How the builder in use words a RUN step's exit status `code`.
    pub fn exit_code_text(&self, code: u8) -> String {
        if self.classic() {
            format!("non-zero code: {code}")
        } else {
            format!("exit code: {code}")
        }
    }

    pub fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from the test bed env"))
    }

    /// A name no other test (or earlier run) uses.
    pub fn unique(&self, prefix: &str) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        format!(
            "{prefix}-{}-{nanos:x}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        )
    }

    pub fn new_repo(&self, prefix: &str) -> FixtureRepo {
        let name = format!("tests/{}", self.unique(prefix));
        let bare = Path::new(self.get("TESTBED_GIT_ROOT")).join(format!("{name}.git"));
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "--bare", "-q", "-b", "main"]);
        git(&bare, &["config", "uploadpack.allowAnySHA1InWant", "true"]);
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &["init", "-q", "-b", "main"]);
        FixtureRepo { name, bare, work }
    }

    /// The `gitProvider` object of a CUSTOM job against the test bed's git
    /// server, with the given password.
    pub fn custom_provider(&self, password: &str) -> Value {
        serde_json::json!({
            "type": "CUSTOM",
            "installationId": null,
            "githubAccount": null,
            "url": self.get("TESTBED_GIT_URL"),
            "username": self.get("TESTBED_GIT_USERNAME"),
            "password": password,
        })
    }

    pub fn job(&self, repo: &FixtureRepo, extra: Value) -> Job {
        let deployment_id = self.unique("dep");
        let service_id = self.unique("svc");
        let mut job = serde_json::json!({
            "deploymentId": deployment_id,
            "serviceId": service_id,
            "commitSha": "",
            "branch": "main",
            "repositoryName": repo.name,
            "runtimeFilePath": null,
            "gitProvider": self.custom_provider(self.get("TESTBED_GIT_PASSWORD")),
            "environmentVariables": [],
            "ports": [{"servicePort": 80, "containerPort": 3000}],
        });
        for (k, v) in extra.as_object().expect("extra fields are an object") {
            job[k] = v.clone();
        }
        Job {
            deployment_id,
            service_id,
            json: job,
        }
    }

    /// The test bed's settings as the daemon reads them (without the
    /// TESTBED_ ones), for running the binary's other commands.
    pub fn daemon_env(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .filter(|(k, _)| !k.starts_with("TESTBED_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn start_daemon(&self, extra_env: &[(&str, &str)]) -> Daemon {
        self.start_daemon_on(&self.unique("test-queue"), &self.unique("worker"), extra_env)
    }

    /// Starts the daemon on a given queue and worker id: a second start with
    /// the same ones is what systemd's restart of a builder looks like.
    pub fn start_daemon_on(&self, queue: &str, worker_id: &str, extra_env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("daemon.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_deployra-builder"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            if !k.starts_with("TESTBED_") {
                cmd.env(k, v);
            }
        }
        cmd.env("REDIS_QUEUE_NAME", queue)
            .env("WORKER_ID", worker_id)
            .env("WORK_DIR", dir.path().join("work"))
            .env("LOG_LEVEL", "info");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cannot start deployra-builder");
        Daemon {
            child,
            queue: queue.to_owned(),
            worker_id: worker_id.to_owned(),
            log_path,
            dir,
        }
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let url = format!("redis://{}:{}/", self.get("REDIS_HOST"), self.get("REDIS_PORT"));
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("test bed Redis is not reachable")
    }

    pub async fn rpush(&self, queue: &str, payload: &str) {
        let mut conn = self.redis().await;
        let _: i64 = redis::cmd("RPUSH")
            .arg(queue)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    pub async fn lrange(&self, key: &str) -> Vec<String> {
        let mut conn = self.redis().await;
        redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Every call the recording dashboard received for a deployment.
    pub async fn calls(&self, deployment_id: &str) -> Vec<Value> {
        let mut url = reqwest::Url::parse(&format!("{}/_testbed/calls", self.get("TESTBED_DASHBOARD_URL"))).unwrap();
        url.query_pairs_mut().append_pair("deploymentId", deployment_id);
        reqwest::Client::new()
            .get(url)
            .send()
            .await
            .expect("recording dashboard unreachable")
            .json()
            .await
            .unwrap()
    }

    /// Waits for the deployment's final status (BUILDED, FAILED or
    /// CANCELLED) and returns all its calls.
    pub async fn wait_final(&self, deployment_id: &str, daemon: &mut impl Builder) -> Dashboard {
        let started = Instant::now();
        loop {
            let calls = self.calls(deployment_id).await;
            let finished = calls.iter().any(|c| {
                c["kind"] == "status"
                    && matches!(c["body"]["status"].as_str(), Some("BUILDED" | "FAILED" | "CANCELLED"))
            });
            if finished {
                // A moment for anything that would wrongly follow the final
                // status (a second BUILDED, late logs) to arrive as well.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Dashboard {
                    calls: self.calls(deployment_id).await,
                };
            }
            if let Some(status) = daemon.exited() {
                panic!(
                    "daemon exited ({status}) before {deployment_id} finished:\n{}",
                    daemon.output()
                );
            }
            assert!(
                started.elapsed() < WAIT,
                "no final status for {deployment_id} after {WAIT:?}; calls: {calls:#?}\ndaemon output:\n{}",
                daemon.output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the deployment's log holds `count` lines that are
    /// `needle` (a build step's output, say; not the step's own echo of its
    /// command).
    pub async fn wait_log(&self, deployment_id: &str, needle: &str, count: usize, daemon: &mut Daemon) {
        let started = Instant::now();
        loop {
            let dash = Dashboard {
                calls: self.calls(deployment_id).await,
            };
            if dash.log_lines().iter().filter(|l| l.trim() == needle).count() >= count {
                return;
            }
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!(
                    "daemon exited ({status}) before {needle:?} appeared:\n{}",
                    daemon.output()
                );
            }
            assert!(
                started.elapsed() < WAIT,
                "{needle:?} never appeared {count} times in the log of {deployment_id}:\n{}\ndaemon output:\n{}",
                dash.log_lines().join("\n"),
                daemon.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn publish_cancel(&self, deployment_id: &str) {
        self.publish_cancel_on(&mut self.redis().await, deployment_id).await;
    }

    pub async fn publish_cancel_on(&self, conn: &mut redis::aio::MultiplexedConnection, deployment_id: &str) {
        let message = serde_json::json!({ "deploymentId": deployment_id }).to_string();
        let _: i64 = redis::cmd("PUBLISH")
            .arg("builder:cancel")
            .arg(message)
            .query_async(conn)
            .await
            .unwrap();
    }

    pub fn registry_client(&self) -> reqwest::Client {
        let ca = std::fs::read(self.get("TESTBED_REGISTRY_CA")).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap()
    }

    /// GET on the registry's v2 API, with the ECR stand-in's credentials.
    pub async fn registry_get(&self, path: &str) -> reqwest::Response {
        let url = format!("https://{}/v2/{path}", self.get("TESTBED_REGISTRY_HOST"));
        self.registry_client()
            .get(url)
            .basic_auth(
                self.get("TESTBED_REGISTRY_USERNAME"),
                Some(self.get("TESTBED_REGISTRY_PASSWORD")),
            )
            .header(
                "Accept",
                "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
            )
            .send()
            .await
            .unwrap()
    }

    pub async fn ecr(&self) -> aws_sdk_ecr::Client {
        let config = aws_sdk_ecr::Config::builder()
            .behavior_version(aws_sdk_ecr::config::BehaviorVersion::latest())
            .region(aws_sdk_ecr::config::Region::new(self.get("AWS_REGION").to_owned()))
            .endpoint_url(self.get("AWS_ENDPOINT_URL"))
            .credentials_provider(aws_sdk_ecr::config::Credentials::new(
                self.get("AWS_ACCESS_KEY_ID"),
                self.get("AWS_SECRET_ACCESS_KEY"),
                None,
                None,
                "testbed",
            ))
            .build();
        aws_sdk_ecr::Client::from_conf(config)
    }

    /// Pulls `image` with a throwaway docker config (no login left behind)
    /// and prints a file of it.
    pub fn read_file_in_image(&self, image: &str, path: &str) -> String {
        self.with_pulled(image, |docker| {
            String::from_utf8(docker(&["run", "--rm", image, "cat", path])).unwrap()
        })
    }

    /// Everything the registry's copy of `image` holds: its history (the
    /// commands of every step, untruncated), its config (`docker inspect`)
    /// and every byte of its layers (`docker save`).
    pub fn image_contents(&self, image: &str) -> Vec<u8> {
        self.with_pulled(image, |docker| {
            let mut all = docker(&["history", "--no-trunc", "--format", "{{.CreatedBy}}", image]);
            all.extend(docker(&["inspect", image]));
            all.extend(docker(&["save", image]));
            all
        })
    }

    /// Pulls `image` from the test bed's registry, gives `inspect` a docker
    /// command to run against it, then removes it again.
    fn with_pulled<T>(&self, image: &str, inspect: impl FnOnce(&dyn Fn(&[&str]) -> Vec<u8>) -> T) -> T {
        let config = tempfile::tempdir().unwrap();
        let docker = |args: &[&str]| docker_with_config(config.path(), args);
        docker(&[
            "login",
            "-u",
            self.get("TESTBED_REGISTRY_USERNAME"),
            "-p",
            self.get("TESTBED_REGISTRY_PASSWORD"),
            self.get("TESTBED_REGISTRY_HOST"),
        ]);
        docker(&["pull", "-q", image]);
        let result = inspect(&docker);
        docker(&["rmi", image]);
        result
    }
}

pub struct Job {
    pub deployment_id: String,
    pub service_id: String,
    pub json: Value,
}

impl Job {
    pub fn payload(&self) -> String {
        self.json.to_string()
    }
}

pub struct FixtureRepo {
    pub name: String,
    pub bare: PathBuf,
    work: tempfile::TempDir,
}

impl FixtureRepo {
    pub fn write(&self, path: &str, content: &str) -> &Self {
        let file = self.work.path().join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
        self
    }

    /// A symbolic link at `path` to `target`, as git stores one.
    pub fn symlink(&self, path: &str, target: &str) -> &Self {
        let link = self.work.path().join(path);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, link).unwrap();
        self
    }

    /// Commits everything and pushes `main`; returns the commit id.
    pub fn commit(&self, message: &str) -> String {
        git(self.work.path(), &["add", "-A"]);
        git(
            self.work.path(),
            &[
                "-c",
                "user.name=Test",
                "-c",
                "user.email=test@example.com",
                "commit",
                "-q",
                "-m",
                message,
            ],
        );
        git(
            self.work.path(),
            &["push", "-q", self.bare.to_str().unwrap(), "HEAD:refs/heads/main"],
        );
        git(self.work.path(), &["rev-parse", "HEAD"]).trim().to_owned()
    }
}

/// Containers (running or not) whose command contains `marker`: a build
/// step of ours that the engine still has.
/// Runs the docker CLI with its own config directory (its logins); fails
/// the test when the command fails, and gives its standard output.
pub fn docker_with_config(config: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("docker")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn containers_with(marker: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Command}}"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.contains(marker))
        .map(str::to_owned)
        .collect()
}

/// What runs a build step whose command holds `marker`: the classic
/// builder's containers, or the processes BuildKit runs directly (they are
/// no containers of the Engine's, but they are processes of this host).
pub fn build_steps_with(marker: &str) -> Vec<String> {
    let mut found = containers_with(marker);
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(format!("pid {pid}: {cmdline}"));
        }
    }
    found
}

/// Polls `condition` until it holds; fails after [`WAIT`] with `what`.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < WAIT, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis server of a test's own, with persistence, that the test may
/// restart without disturbing the others.
pub struct PrivateRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = PrivateRedis {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not installed");
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < WAIT, "private redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (SIGTERM: it saves its append-only file) and starts
    /// it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-s", "TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").current_dir(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub struct Daemon {
    child: Child,
    pub queue: String,
    pub worker_id: String,
    log_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Everything the daemon wrote to stdout and stderr so far (what
    /// journald would hold).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// This daemon's own work directory (WORK_DIR/WORKER_ID).
    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work").join(&self.worker_id)
    }

    /// The most memory the daemon has held so far (`VmHWM`), in KiB.
    pub fn peak_memory_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("no VmHWM in /proc/<pid>/status")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {signal} failed");
    }

    /// Waits for the daemon to exit by itself.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < WAIT, "daemon did not exit:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the daemon has written `needle` to its output.
    pub async fn wait_output(&mut self, needle: &str) {
        let started = Instant::now();
        while !self.output().contains(needle) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited ({status}) before writing {needle:?}:\n{}", self.output());
            }
            assert!(
                started.elapsed() < WAIT,
                "daemon never wrote {needle:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running builder, as the waits above watch it: a process of the test's
/// own ([`Daemon`]), or a service under systemd (tests/systemd.rs).
pub trait Builder {
    /// How it ended, once it has, for good.
    fn exited(&mut self) -> Option<String>;
    /// What it wrote so far (its journal).
    fn output(&self) -> String;
}

impl Builder for Daemon {
    fn exited(&mut self) -> Option<String> {
        self.child.try_wait().unwrap().map(|status| status.to_string())
    }

    fn output(&self) -> String {
        Daemon::output(self)
    }
}

/// The calls one deployment made to the dashboard.
pub struct Dashboard {
    pub calls: Vec<Value>,
}

impl Dashboard {
    pub fn statuses(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter(|c| c["kind"] == "status")
            .map(|c| c["body"]["status"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    pub fn final_status(&self) -> &Value {
        self.calls
            .iter()
            .rev()
            .find(|c| c["kind"] == "status")
            .map(|c| &c["body"])
            .expect("no status call")
    }

    /// The deployment's log as the user sees it: every `logs` text and the
    /// `logs.text` of status calls, in arrival order, split into lines.
    pub fn log_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for c in &self.calls {
            let text = match c["kind"].as_str() {
                Some("logs") => c["body"]["text"].as_str(),
                _ => c["body"]["logs"]["text"].as_str(),
            };
            if let Some(text) = text {
                lines.extend(text.split('\n').map(str::to_owned));
            }
        }
        lines
    }

    /// Every byte the builder sent the dashboard, for secret searches.
    pub fn everything(&self) -> String {
        self.calls
            .iter()
            .map(|c| c["body"].to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Asserts that `expected` appear in the log in this order.
    pub fn assert_in_order(&self, expected: &[&str]) {
        let lines = self.log_lines();
        let mut at = 0;
        for want in expected {
            match lines[at..].iter().position(|l| l.contains(want)) {
                Some(i) => at += i + 1,
                None => panic!("{want:?} not found (in order) in the log:\n{}", lines.join("\n")),
            }
        }
    }
}
