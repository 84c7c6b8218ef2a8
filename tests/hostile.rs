//! Messy repositories and bad input, end to end: buildpacks when there is no
//! Dockerfile, `.dockerignore` and `.env` as Docker and dotenv readers see
//! them, every class of invalid job, and secrets on every output channel.

mod common;

use std::collections::HashMap;

use common::Testbed;
use serde_json::json;

/// A `pack` stand-in for this test: a link to testbed/fake-pack with its
/// knobs in a file beside it.
struct FakePack {
    dir: tempfile::TempDir,
}

impl FakePack {
    fn new() -> FakePack {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(
            concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/fake-pack"),
            dir.path().join("pack"),
        )
        .unwrap();
        let record = dir.path().join("argv");
        std::fs::write(
            dir.path().join("fake-pack.env"),
            format!("export FAKE_PACK_RECORD='{}'\n", record.display()),
        )
        .unwrap();
        FakePack { dir }
    }

    fn bin(&self) -> String {
        self.dir.path().join("pack").to_str().unwrap().to_owned()
    }

    fn argv(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("argv"))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_without_dockerfile_is_built_with_buildpacks() {
    let tb = Testbed::load();
    let repo = tb.new_repo("buildpacks");
    repo.write("server.js", "console.log('hi')\n")
        .write("package.json", "{}\n");
    repo.commit("node app, no Dockerfile");
    let pack = FakePack::new();
    let mut daemon = tb.start_daemon(&[("PACK_BIN", &pack.bin()), ("PAKETO_BUILDER", "example/builder:test")]);
    let job = tb.job(
        &repo,
        json!({
            "environmentVariables": [{"key": "GREETING", "value": "hello buildpacks"}],
            "ports": [{"servicePort": 80, "containerPort": 8080}],
        }),
    );
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    dash.assert_in_order(&[
        "No Dockerfile at Dockerfile; building",
        "===> DETECTING",
        "===> BUILDING",
        "[builder] this line goes to stderr",
        "===> EXPORTING",
        "Image pushed:",
    ]);
    let argv = pack.argv();
    for (flag, value) in [
        ("--platform", "linux/amd64"),
        ("--builder", "example/builder:test"),
        ("--env", "PORT=8080"),
    ] {
        assert!(
            argv.windows(2).any(|w| w[0] == flag && w[1] == value),
            "{flag} {value} missing from {argv:?}"
        );
    }
    assert!(argv.contains(&"--trust-builder".to_owned()));
    assert!(
        !argv.iter().any(|a| a.contains("hello buildpacks")),
        "env values stay off the command line"
    );
    let uri = dash.final_status()["data"]["containerImageUri"].as_str().unwrap();
    let env = tb.read_file_in_image(uri, "/workspace/.pack-env");
    assert!(env.lines().any(|l| l == "PORT=8080"), "{env}");
    assert!(env.lines().any(|l| l == "GREETING=hello buildpacks"), "{env}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_pack_binary_fails_with_how_to_install_it() {
    let tb = Testbed::load();
    let repo = tb.new_repo("no-pack");
    repo.write("main.py", "print(1)\n").commit("python app");
    let mut daemon = tb.start_daemon(&[("PACK_BIN", "/nonexistent/pack")]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "FAILED"]);
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(
        error.contains("pack CLI not found") && error.contains("install it"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dockerignore_and_env_reach_the_image_as_docker_and_dotenv_would_have_them() {
    let tb = Testbed::load();
    let repo = tb.new_repo("context");
    repo.write(
        "Dockerfile",
        "FROM local/busybox:latest\nCOPY . /app\nRUN find /app | sort > /listing.txt\n",
    )
    .write(
        ".dockerignore",
        "# user's own rules\nsecret.txt\nlogs/**\n!logs/keep.log\n*.tmp\n",
    )
    .write("secret.txt", "not for the image\n")
    .write("logs/a.log", "dropped\n")
    .write("logs/keep.log", "kept\n")
    .write("scratch.tmp", "dropped\n")
    .write("src/app.txt", "kept\n");
    repo.commit("context rules");
    let values: Vec<(&str, &str)> = vec![
        ("PLAIN", "production"),
        ("SPACES", "  has spaces inside  "),
        ("HASH", "value # not a comment"),
        ("DOLLAR", "costs $5 and ${HOME}"),
        ("QUOTES", "it's \"quoted\""),
        ("EQUALS", "a=b=c"),
        ("MULTILINE", "line one\nline two"),
        ("UNICODE", "ünïcødé ✓"),
    ];
    let env: Vec<_> = values.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({ "environmentVariables": env }));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    let uri = dash.final_status()["data"]["containerImageUri"].as_str().unwrap();

    let listing = tb.read_file_in_image(uri, "/listing.txt");
    let listing: Vec<&str> = listing.lines().collect();
    for present in [
        "/app/Dockerfile",
        "/app/.dockerignore",
        "/app/logs/keep.log",
        "/app/src/app.txt",
        "/app/.env",
    ] {
        assert!(listing.contains(&present), "{present} missing from {listing:?}");
    }
    for absent in ["/app/secret.txt", "/app/logs/a.log", "/app/scratch.tmp", "/app/.git"] {
        assert!(!listing.contains(&absent), "{absent} must not be in {listing:?}");
    }
    let dockerignore = tb.read_file_in_image(uri, "/app/.dockerignore");
    assert!(dockerignore.starts_with("# user's own rules\nsecret.txt\n") && dockerignore.ends_with(".git\n"));

    let dotenv = tb.read_file_in_image(uri, "/app/.env");
    let parsed: HashMap<String, String> = dotenvy::from_read_iter(dotenv.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    for (key, value) in values {
        assert_eq!(parsed.get(key).map(String::as_str), Some(value), "{key} in\n{dotenv}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_kind_of_invalid_job_fails_naming_the_field() {
    let tb = Testbed::load();
    let repo = tb.new_repo("invalid");
    repo.write("Dockerfile", "FROM local/busybox:latest\n")
        .write("a.txt", "1\n");
    let first = repo.commit("first");
    repo.write("a.txt", "2\n").commit("second");
    let cases = [
        (json!({"repositoryName": null}), "repositoryName: missing"),
        (json!({"gitProvider": {"type": "BITBUCKET"}}), "gitProvider.type"),
        (
            json!({"gitProvider": {"type": "CUSTOM", "url": null}}),
            "gitProvider.url",
        ),
        (json!({"runtimeFilePath": "../../etc/passwd"}), "runtimeFilePath"),
        (json!({"runtimeFilePath": "/etc/passwd"}), "runtimeFilePath"),
        (json!({"commitSha": "xyz-not-hex"}), "commitSha"),
        (
            // A value pasted where the name goes: never quoted back.
            json!({"environmentVariables": [{"key": "sk_live=pasted-into-the-name", "value": "v"}]}),
            "environmentVariables[0].key: is not a valid variable name",
        ),
        (
            json!({"ports": [{"containerPort": "eighty"}]}),
            "ports[0].containerPort",
        ),
        (
            json!({"environmentVariables": (0..1001)
                .map(|i| json!({"key": format!("VAR_{i}"), "value": format!("value-{i}")}))
                .collect::<Vec<_>>()}),
            "environmentVariables: 1001 variables, more than the 1000 a build takes",
        ),
        (
            json!({"branch": "no-such-branch"}),
            "branch \"no-such-branch\" not found",
        ),
        (
            json!({"commitSha": "0123456789abcdef0123456789abcdef01234567"}),
            "commit 0123456789abcdef0123456789abcdef01234567 not found",
        ),
        (json!({"repositoryName": "tests/does-not-exist"}), "clone: fetching"),
    ];
    let mut daemon = tb.start_daemon(&[]);
    let mut jobs = Vec::new();
    for (patch, _) in &cases {
        let job = tb.job(&repo, patch.clone());
        tb.rpush(&daemon.queue, &job.payload()).await;
        jobs.push(job);
    }
    // A valid job after all of them still builds, at the old commit.
    let valid = tb.job(&repo, json!({ "commitSha": first }));
    tb.rpush(&daemon.queue, &valid.payload()).await;
    for (job, (patch, expected)) in jobs.iter().zip(&cases) {
        let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
        assert_eq!(dash.final_status()["status"], "FAILED", "{patch}: {:#?}", dash.calls);
        let error = dash.final_status()["error"].as_str().unwrap();
        assert!(
            error.contains(expected),
            "{patch}: {error:?} should mention {expected:?}"
        );
        assert!(
            !dash.everything().contains("pasted-into-the-name"),
            "{patch}: {error:?}"
        );
    }
    assert_eq!(
        tb.wait_final(&valid.deployment_id, &mut daemon).await.statuses(),
        ["BUILDING", "BUILDED"]
    );
    assert!(!daemon.output().contains("pasted-into-the-name"), "{}", daemon.output());
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_the_dashboard_the_journal_or_an_error() {
    let tb = Testbed::load();
    // Unique per run, so no cached layer hides the step that prints it.
    let env_secret = &format!("env-secret-Qm7Tz91Lx-{}", tb.unique("v"));
    let url_password = tb.get("TESTBED_GIT_PASSWORD");
    let repo = tb.new_repo("secrets");
    repo.write(
        "Dockerfile",
        "FROM local/busybox:latest\nCOPY .env /tmp/.env\nRUN cat /tmp/.env\nRUN . /tmp/.env && echo \"leaking:$API_TOKEN\" && exit 7\n",
    )
    .commit("leaky build");
    let mut daemon = tb.start_daemon(&[]);
    // Credentials written into the provider URL, as some operators do.
    let provider = json!({
        "type": "CUSTOM",
        "url": format!("http://{}:{url_password}@127.0.0.1:8418", tb.get("TESTBED_GIT_USERNAME")),
        "username": null,
        "password": null,
    });
    let job = tb.job(
        &repo,
        json!({
            "gitProvider": provider,
            "environmentVariables": [{"key": "API_TOKEN", "value": env_secret}],
        }),
    );
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "FAILED"], "{:#?}", dash.calls);
    // The build echoed the secret; the user sees that it did, masked.
    dash.assert_in_order(&["API_TOKEN='***'", "leaking:***"]);
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(error.contains(&tb.exit_code_text(7)), "{error}");

    // A build that succeeds pushes with the registry password.
    let clean = tb.new_repo("secrets-clean");
    clean
        .write("Dockerfile", "FROM local/busybox:latest\nCOPY . /app\n")
        .commit("c");
    let ok = tb.job(
        &clean,
        json!({ "environmentVariables": [{"key": "API_TOKEN", "value": env_secret}] }),
    );
    tb.rpush(&daemon.queue, &ok.payload()).await;
    let ok_dash = tb.wait_final(&ok.deployment_id, &mut daemon).await;
    assert_eq!(ok_dash.statuses(), ["BUILDING", "BUILDED"]);

    let journal = daemon.output();
    for secret in [
        env_secret,
        url_password,
        tb.get("TESTBED_REGISTRY_PASSWORD"),
        tb.get("API_KEY"),
    ] {
        for (channel, text) in [
            ("dashboard", dash.everything()),
            ("dashboard", ok_dash.everything()),
            ("journal", journal.clone()),
        ] {
            assert!(!text.contains(secret), "{secret:?} reached the {channel}");
        }
    }
}

/// A "git server" that accepts every connection and never says a word.
struct SilentServer {
    port: u16,
    held: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl SilentServer {
    fn start() -> SilentServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = held.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                keep.lock().unwrap().push(stream);
            }
        });
        SilentServer { port, held }
    }

    fn connections(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    fn provider(&self) -> serde_json::Value {
        json!({
            "type": "CUSTOM",
            "url": format!("http://127.0.0.1:{}", self.port),
            "username": "u",
            "password": "p",
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_git_server_that_never_answers_is_cut_by_timeout_cancel_and_shutdown() {
    let tb = Testbed::load();
    let silent = SilentServer::start();
    let repo = tb.new_repo("silent");
    // The build timeout ends it.
    let mut daemon = tb.start_daemon(&[("BUILD_TIMEOUT_SECS", "3")]);
    let timed_out = tb.job(&repo, json!({ "gitProvider": silent.provider() }));
    tb.rpush(&daemon.queue, &timed_out.payload()).await;
    let dash = tb.wait_final(&timed_out.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "FAILED"], "{:#?}", dash.calls);
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(error.contains("timed out"), "{error}");
    drop(daemon);

    // So does a cancel, once the fetch is stuck.
    let mut daemon = tb.start_daemon(&[("SHUTDOWN_GRACE_SECS", "1")]);
    let cancelled = tb.job(&repo, json!({ "gitProvider": silent.provider() }));
    let before = silent.connections();
    tb.rpush(&daemon.queue, &cancelled.payload()).await;
    common::wait_until("the fetch is connected", || silent.connections() > before).await;
    tb.publish_cancel(&cancelled.deployment_id).await;
    let dash = tb.wait_final(&cancelled.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "CANCELLED"], "{:#?}", dash.calls);

    // And a shutdown: the daemon exits, the job goes back to the queue.
    let interrupted = tb.job(&repo, json!({ "gitProvider": silent.provider() }));
    let before = silent.connections();
    tb.rpush(&daemon.queue, &interrupted.payload()).await;
    common::wait_until("the fetch is connected", || silent.connections() > before).await;
    daemon.signal("TERM");
    let status = daemon.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", daemon.output());
    assert_eq!(tb.lrange(&daemon.queue).await, [interrupted.payload()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dockerignore_linked_to_a_file_of_the_repository_is_followed() {
    let tb = Testbed::load();
    let repo = tb.new_repo("ignore-link");
    let marker = tb.unique("ignore-link");
    repo.write(
        "Dockerfile",
        &format!(
            "FROM local/busybox:latest\nCOPY . /app\nRUN test ! -e /app/secret.txt && echo secret-left-out-{marker}\n"
        ),
    )
    .write("config/docker-ignore", "secret.txt\n")
    .symlink(".dockerignore", "config/docker-ignore")
    .write("secret.txt", "not for the image\n")
    .write("app.txt", "kept\n")
    .commit("shared ignore rules");
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    dash.assert_in_order(&[&format!("secret-left-out-{marker}")]);
    let uri = dash.final_status()["data"]["containerImageUri"].as_str().unwrap();
    assert_eq!(tb.read_file_in_image(uri, "/app/app.txt"), "kept\n");
}
