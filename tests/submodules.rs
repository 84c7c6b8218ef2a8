//! End to end: repositories with submodules, built by the real daemon from
//! the test bed's git server. A relay on an address of its own stands in for
//! a second git host: it records what the daemon sends it, and can trickle
//! its answers to make a fetch slow enough to cancel.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{git, FixtureRepo, Testbed};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DOCKERFILE: &str = "FROM local/busybox:latest
COPY . /app
RUN test ! -e /app/vendor/lib/.git && echo no-git-in-$(echo submodule)
";

/// A fixture repository committed from a working tree of its own: one that
/// can hold gitlinks and binary files, which [`FixtureRepo::write`] cannot.
struct Worktree {
    repo: FixtureRepo,
    dir: tempfile::TempDir,
}

impl Worktree {
    fn new(tb: &Testbed, prefix: &str) -> Worktree {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q", "-b", "main"]);
        Worktree {
            repo: tb.new_repo(prefix),
            dir,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, path: &str, content: impl AsRef<[u8]>) -> &Self {
        let file = self.path().join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
        git(self.path(), &["add", path]);
        self
    }

    /// Pins `path` to `commit` of the repository at `url`, as `git submodule
    /// add` records it: a `.gitmodules` entry named after the path, and a
    /// gitlink in the index.
    fn submodule(&self, path: &str, url: &str, commit: &str) -> &Self {
        for (key, value) in [("path", path), ("url", url)] {
            git(
                self.path(),
                &["config", "-f", ".gitmodules", &format!("submodule.{path}.{key}"), value],
            );
        }
        git(
            self.path(),
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("160000,{commit},{path}"),
            ],
        );
        git(self.path(), &["add", ".gitmodules"]);
        self
    }

    /// Commits the index and pushes `main`; returns the commit id.
    fn commit(&self, message: &str) -> String {
        git(
            self.path(),
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
            self.path(),
            &["push", "-q", self.repo.bare.to_str().unwrap(), "HEAD:refs/heads/main"],
        );
        git(self.path(), &["rev-parse", "HEAD"]).trim().to_owned()
    }

    /// The URL of this repository relative to a sibling in the test bed, as
    /// GitHub projects usually write it.
    fn relative_url(&self) -> String {
        let name = self.repo.name.strip_prefix("tests/").unwrap();
        format!("../{name}.git")
    }

    fn url_on(&self, base: &str) -> String {
        format!("{base}/{}.git", self.repo.name)
    }
}

/// How fast a trickled answer comes: 80 KiB/s.
const TRICKLE_CHUNK: usize = 8 * 1024;
const TRICKLE_PAUSE: Duration = Duration::from_millis(100);

/// A TCP relay to the test bed's git server, listening on an address of its
/// own. It records every byte clients send, and trickles the answers on
/// connections that ask for `slow_repo`.
struct Relay {
    url: String,
    received: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(tb: &Testbed, ip: &str, slow_repo: Option<String>) -> Relay {
        let git_url = reqwest::Url::parse(tb.get("TESTBED_GIT_URL")).unwrap();
        let upstream = format!(
            "{}:{}",
            git_url.host_str().unwrap(),
            git_url.port_or_known_default().unwrap()
        );
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let received = Arc::clone(&received);
            async move {
                // Dropped with the task, which aborts every connection.
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    connections.spawn(relay(
                        client,
                        upstream.clone(),
                        Arc::clone(&received),
                        slow_repo.clone(),
                    ));
                }
            }
        });
        Relay { url, received, task }
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, upstream: String, received: Arc<Mutex<Vec<u8>>>, slow_repo: Option<String>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let mut first = vec![0; 64 * 1024];
    let Ok(n @ 1..) = from_client.read(&mut first).await else {
        return;
    };
    received.lock().unwrap().extend_from_slice(&first[..n]);
    let slow = slow_repo.is_some_and(|repo| String::from_utf8_lossy(&first[..n]).contains(&format!("/{repo}.git/")));
    if to_server.write_all(&first[..n]).await.is_err() {
        return;
    }
    let upload = async move {
        let mut buf = vec![0; 64 * 1024];
        while let Ok(n @ 1..) = from_client.read(&mut buf).await {
            received.lock().unwrap().extend_from_slice(&buf[..n]);
            if to_server.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to_server.shutdown().await;
    };
    let download = async move {
        let mut buf = vec![0; if slow { TRICKLE_CHUNK } else { 64 * 1024 }];
        while let Ok(n @ 1..) = from_server.read(&mut buf).await {
            if to_client.write_all(&buf[..n]).await.is_err() {
                break;
            }
            if slow {
                tokio::time::sleep(TRICKLE_PAUSE).await;
            }
        }
        let _ = to_client.shutdown().await;
    };
    tokio::join!(upload, download);
}

/// Bytes that do not compress, so that their pack is as large as they are.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn assert_password_kept(tb: &Testbed, dash: &common::Dashboard, daemon: &common::Daemon) {
    let password = tb.get("TESTBED_GIT_PASSWORD");
    assert!(
        !dash.everything().contains(password),
        "the git password reached the dashboard"
    );
    assert!(
        !daemon.output().contains(password),
        "the git password reached the journal"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submodule_with_a_relative_url_is_built_at_its_pinned_commit() {
    let tb = Testbed::load();
    let lib = Worktree::new(&tb, "lib");
    lib.write("lib.txt", "pinned lib\n");
    let pinned = lib.commit("pinned");
    lib.write("lib.txt", "lib tip\n");
    let tip = lib.commit("tip");
    assert_ne!(pinned, tip);

    let app = Worktree::new(&tb, "superproject");
    app.write("Dockerfile", DOCKERFILE)
        .write("app.txt", "app\n")
        .submodule("vendor/lib", &lib.relative_url(), &pinned);
    let sha = app.commit("with a submodule");

    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&app.repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    dash.assert_in_order(&[&format!("Checked out commit {sha}"), "Image pushed:"]);
    assert!(
        dash.log_lines().iter().any(|l| l.trim() == "no-git-in-submodule"),
        "the submodule's directory has a .git:\n{}",
        dash.log_lines().join("\n")
    );
    let uri = dash.final_status()["data"]["containerImageUri"].as_str().unwrap();
    assert_eq!(tb.read_file_in_image(uri, "/app/vendor/lib/lib.txt"), "pinned lib\n");
    assert_password_kept(&tb, &dash, &daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_submodules_on_the_same_host_are_built() {
    let tb = Testbed::load();
    let leaf = Worktree::new(&tb, "leaf");
    leaf.write("leaf.txt", "leaf content\n");
    let leaf_sha = leaf.commit("leaf");

    let lib = Worktree::new(&tb, "middle");
    lib.write("lib.txt", "middle content\n")
        .submodule("deps/leaf", &leaf.relative_url(), &leaf_sha);
    let lib_sha = lib.commit("middle");

    // An absolute URL on the job's host: the job's credentials apply.
    let app = Worktree::new(&tb, "nesting");
    app.write(
        "Dockerfile",
        format!("{DOCKERFILE}RUN cat /app/vendor/lib/lib.txt /app/vendor/lib/deps/leaf/leaf.txt\n"),
    )
    .submodule("vendor/lib", &lib.url_on(tb.get("TESTBED_GIT_URL")), &lib_sha);
    app.commit("nested submodules");

    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&app.repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    let lines = dash.log_lines();
    let position = |text: &str| lines.iter().position(|l| l.trim() == text);
    let (middle, inner) = (position("middle content"), position("leaf content"));
    assert!(
        middle.is_some() && inner > middle,
        "submodule files missing from the build:\n{}",
        lines.join("\n")
    );
    assert_password_kept(&tb, &dash, &daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submodule_on_another_host_is_fetched_without_the_job_s_credentials() {
    let tb = Testbed::load();
    let lib = Worktree::new(&tb, "foreign");
    lib.write("lib.txt", "private\n");
    let pinned = lib.commit("c");
    // Another host to the daemon, the same git server (which wants a
    // password) behind it: were the job's credentials sent, the fetch would
    // succeed.
    let other_host = Relay::start(&tb, "127.0.0.2", None).await;
    let lib_url = lib.url_on(&other_host.url);

    let app = Worktree::new(&tb, "uses-foreign");
    app.write("Dockerfile", DOCKERFILE)
        .submodule("vendor/lib", &lib_url, &pinned);
    app.commit("foreign submodule");

    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&app.repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "FAILED"], "{:#?}", dash.calls);
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!("clone: submodule vendor/lib ({lib_url}): ")),
        "{error}"
    );
    assert!(error.contains("must be public"), "{error}");

    let received = other_host.received();
    assert!(
        received.contains(&format!("/{}.git/info/refs", lib.repo.name)),
        "the other host was never asked:\n{received}"
    );
    assert!(
        !received.to_ascii_lowercase().contains("authorization:"),
        "credentials were sent to another host:\n{received}"
    );
    assert_password_kept(&tb, &dash, &daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_stops_a_submodule_fetch() {
    let tb = Testbed::load();
    let lib = Worktree::new(&tb, "slow-lib");
    lib.write("big.bin", noise(2 << 20));
    let pinned = lib.commit("big");
    // The whole job goes through the relay, so the submodule is on the
    // job's host; only the submodule's answers are trickled (2 MiB at
    // 80 KiB/s: 25 s).
    let git_host = Relay::start(&tb, "127.0.0.1", Some(lib.repo.name.clone())).await;

    let app = Worktree::new(&tb, "cancel-in-submodule");
    app.write("Dockerfile", DOCKERFILE)
        .submodule("vendor/lib", &lib.relative_url(), &pinned);
    app.commit("slow submodule");

    let mut daemon = tb.start_daemon(&[]);
    let provider = json!({
        "type": "CUSTOM",
        "url": git_host.url,
        "username": tb.get("TESTBED_GIT_USERNAME"),
        "password": tb.get("TESTBED_GIT_PASSWORD"),
    });
    let job = tb.job(&app.repo, json!({ "gitProvider": provider }));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let pack_request = format!("POST /{}.git/git-upload-pack", lib.repo.name);
    common::wait_until("the submodule's pack is on its way", || {
        git_host.received().contains(&pack_request)
    })
    .await;

    let cancelled_at = Instant::now();
    tb.publish_cancel(&job.deployment_id).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    let took = cancelled_at.elapsed();
    assert_eq!(dash.statuses(), ["BUILDING", "CANCELLED"], "{:#?}", dash.calls);
    assert!(took < Duration::from_secs(10), "the cancel took {took:?}");
    assert!(
        !dash.log_lines().iter().any(|l| l.contains("Checked out commit")),
        "the checkout finished: the cancel did not stop it"
    );
    assert_password_kept(&tb, &dash, &daemon);
}
