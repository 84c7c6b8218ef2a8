//! Buildpacks builds through `image::pack`, with `testbed/fake-pack` standing
//! in for the real `pack` (which needs builder images from the internet): it
//! records its arguments and builds a real image through the test bed's
//! dockerd; output goes through a real `LogShipper` to the recording
//! dashboard.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Testbed;
use deployra_builder::dashboard::{Dashboard, LogShipper, ShipperLimits};
use deployra_builder::image::pack::{self, PackError, PackRequest, DEFAULT_BUILDER, TERM_GRACE};
use deployra_builder::redact::{Redactor, Secret};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const FAKE_PACK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/fake-pack");

/// One test's stand-in: its own directory with the app, a `pack` symlink to
/// the fake and the knobs the fake reads from next to it, its own image tag
/// (removed on drop) and deployment id.
struct Bed {
    tb: Testbed,
    dir: tempfile::TempDir,
    marker: String,
    deployment_id: String,
    image: String,
}

impl Bed {
    fn new(prefix: &str, knobs: &[(&str, &str)]) -> Bed {
        let tb = Testbed::load();
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir(&app).unwrap();
        std::fs::write(
            app.join("package.json"),
            r#"{"name":"app","scripts":{"start":"node index.js"}}"#,
        )
        .unwrap();
        std::fs::write(app.join("index.js"), "console.log('hello from buildpacks')\n").unwrap();
        std::os::unix::fs::symlink(FAKE_PACK, dir.path().join("pack")).unwrap();

        let marker = tb.unique("fake-pack-marker");
        std::fs::write(app.join("build-id.txt"), &marker).unwrap();
        let record = dir.path().join("argv");
        let mut config = format!(
            "export FAKE_PACK_RECORD='{}'\nexport FAKE_PACK_MARKER='{marker}'\n",
            record.display()
        );
        for (key, value) in knobs {
            config.push_str(&format!("export {key}='{value}'\n"));
        }
        std::fs::write(dir.path().join("fake-pack.env"), config).unwrap();

        let deployment_id = tb.unique("dep-pack");
        let image = format!("deployra-pack-test/{}:0123abcd", tb.unique(prefix));
        Bed {
            tb,
            dir,
            marker,
            deployment_id,
            image,
        }
    }

    fn request(&self, port: u16, env: &[(&str, &str)]) -> PackRequest {
        PackRequest {
            pack_bin: self.dir.path().join("pack").to_str().unwrap().to_owned(),
            builder: DEFAULT_BUILDER.to_owned(),
            root: self.app(),
            image: self.image.clone(),
            port,
            env: env.iter().map(|(k, v)| (k.to_string(), Secret::new(*v))).collect(),
        }
    }

    fn app(&self) -> PathBuf {
        self.dir.path().join("app")
    }

    /// A shipper to the recording dashboard; `redactor` as the pipeline
    /// would build it from the job.
    fn shipper(&self, redactor: Redactor) -> LogShipper {
        let url = reqwest::Url::parse(self.tb.get("API_URL")).unwrap();
        let dashboard = Dashboard::new(url, Secret::new(self.tb.get("API_KEY"))).unwrap();
        LogShipper::start(
            dashboard,
            self.deployment_id.clone(),
            redactor,
            ShipperLimits::default(),
        )
    }

    async fn dashboard(&self) -> common::Dashboard {
        common::Dashboard {
            calls: self.tb.calls(&self.deployment_id).await,
        }
    }

    /// The arguments the fake was started with, one per line.
    fn argv_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("argv")).expect("fake pack did not record its arguments")
    }

    fn argv(&self) -> Vec<String> {
        self.argv_text().lines().map(str::to_owned).collect()
    }

    fn env_file(&self) -> Option<PathBuf> {
        let argv = self.argv();
        let at = argv.iter().position(|a| a == "--env-file")?;
        Some(PathBuf::from(&argv[at + 1]))
    }

    /// Live processes started by this test's fake pack (they inherit its
    /// marker variable), as "pid: command line".
    fn survivors(&self) -> Vec<String> {
        let needle = format!("FAKE_PACK_MARKER={}", self.marker);
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if environ.split(|&b| b == 0).any(|var| var == needle.as_bytes()) {
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                found.push(format!(
                    "{pid}: {}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
            }
        }
        found
    }

    fn run_in_image(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .args(["run", "--rm", &self.image])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker run {} {args:?}: {}",
            self.image,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.image]).output();
    }
}

fn image_exists(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .unwrap()
        .status
        .success()
}

fn after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
    argv.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn app_is_built_by_pack_with_port_and_env_and_output_streams_in_order() {
    let bed = Bed::new("build", &[]);
    let req = bed.request(
        4321,
        &[("NODE_ENV", "production"), ("GREETING", "hello world # not a comment")],
    );
    let shipper = bed.shipper(Redactor::default());

    let result = pack::build(&req, &shipper.sink(), &CancellationToken::new()).await;
    shipper.finish().await;
    result.unwrap();

    assert!(image_exists(&bed.image), "pack left no image {}", bed.image);
    let env = bed.run_in_image(&["cat", "/workspace/.pack-env"]);
    let env: Vec<&str> = env.lines().collect();
    assert_eq!(
        env,
        [
            "GREETING=hello world # not a comment",
            "NODE_ENV=production",
            "PORT=4321"
        ]
    );
    assert_eq!(
        bed.run_in_image(&["cat", "/workspace/index.js"]),
        "console.log('hello from buildpacks')\n"
    );

    let argv = bed.argv();
    assert_eq!(argv[..2], ["build".to_owned(), bed.image.clone()], "{argv:?}");
    assert_eq!(after(&argv, "--platform"), ["linux/amd64"], "{argv:?}");
    assert_eq!(
        after(&argv, "--builder"),
        ["paketobuildpacks/builder-jammy-base"],
        "{argv:?}"
    );
    assert_eq!(after(&argv, "--path"), [bed.app().to_str().unwrap()], "{argv:?}");
    assert_eq!(after(&argv, "--pull-policy"), ["if-not-present"], "{argv:?}");
    assert_eq!(after(&argv, "--env"), ["PORT=4321"], "{argv:?}");
    assert!(argv.iter().any(|a| a == "--trust-builder"), "{argv:?}");
    let env_file = bed.env_file().expect("no --env-file");
    assert!(
        !env_file.starts_with(bed.app()),
        "env file inside the checkout: {env_file:?}"
    );
    assert!(!env_file.exists(), "env file {env_file:?} left behind");

    let dash = bed.dashboard().await;
    dash.assert_in_order(&[
        "===> ANALYZING",
        "===> DETECTING",
        "===> BUILDING",
        "[builder] this line goes to stderr",
        "===> EXPORTING",
        "Step 1/4 : FROM local/busybox:latest",
        "Successfully tagged",
        &format!("Successfully built image {}", bed.image),
    ]);
    let stderr_call = dash
        .calls
        .iter()
        .find(|c| {
            c["body"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("this line goes to stderr"))
        })
        .unwrap();
    assert_eq!(stderr_call["body"]["type"], "STDERR", "{stderr_call}");
    let building = dash
        .calls
        .iter()
        .find(|c| c["body"]["text"].as_str().is_some_and(|t| t.contains("===> BUILDING")))
        .unwrap();
    assert_eq!(building["body"]["type"], "STDOUT", "{building}");
    assert!(dash.calls.iter().all(|c| c["apiKeyOk"] == true && c["answered"] == 200));
}

#[tokio::test(flavor = "multi_thread")]
async fn env_values_stay_off_the_command_line_and_out_of_the_log() {
    let bed = Bed::new("secret", &[]);
    let secret = format!("s3cr3t-{}", bed.tb.unique("value"));
    let multi_line = "-----BEGIN KEY-----\nMIIEvQIBADANBg\n-----END KEY-----";
    let padded = "  padded value ";
    let req = bed.request(
        3000,
        &[("API_TOKEN", &secret), ("TLS_KEY", multi_line), ("PADDED", padded)],
    );
    // No secrets for the redactor: whatever the module itself logs must be
    // clean without its help.
    let shipper = bed.shipper(Redactor::default());

    let result = pack::build(&req, &shipper.sink(), &CancellationToken::new()).await;
    shipper.finish().await;
    result.unwrap();

    let argv = bed.argv_text();
    // What pack's env file cannot express goes by name, its value in pack's
    // environment: no value is on the command line, where `ps` shows it.
    for value in [secret.as_str(), "MIIEvQIBADANBg", "padded value"] {
        assert!(!argv.contains(value), "{value:?} on the command line:\n{argv}");
    }
    assert!(argv.contains("--env\nTLS_KEY\n"), "{argv}");
    assert!(argv.contains("--env\nPADDED\n"), "{argv}");

    let dash = bed.dashboard().await;
    let everything = dash.everything();
    for value in [secret.as_str(), "MIIEvQIBADANBg", "padded value"] {
        assert!(
            !everything.contains(value),
            "{value:?} reached the dashboard:\n{everything}"
        );
    }

    let env = bed.run_in_image(&["cat", "/workspace/.pack-env"]);
    assert!(env.contains(&format!("API_TOKEN={secret}\n")), "{env}");
    assert!(env.contains(&format!("TLS_KEY={multi_line}\n")), "{env}");
    assert!(env.contains(&format!("PADDED={padded}\n")), "{env}");
    assert!(!bed.env_file().unwrap().exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_variable_of_the_job_gives_way_to_the_container_port() {
    let bed = Bed::new("port", &[]);
    let req = bed.request(8080, &[("PORT", "5000"), ("OTHER", "value")]);
    let shipper = bed.shipper(Redactor::default());

    let result = pack::build(&req, &shipper.sink(), &CancellationToken::new()).await;
    shipper.finish().await;
    result.unwrap();

    let env = bed.run_in_image(&["cat", "/workspace/.pack-env"]);
    assert_eq!(env, "OTHER=value\nPORT=8080\n");
    bed.dashboard()
        .await
        .assert_in_order(&["PORT is set to the service's container port 8080"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_pack_binary_says_how_to_install_it() {
    let bed = Bed::new("missing", &[]);
    for bin in ["/nonexistent/pack", "deployra-no-such-pack-binary"] {
        let mut req = bed.request(3000, &[("A_SECRET", "value-of-a-secret")]);
        req.pack_bin = bin.to_owned();
        let shipper = bed.shipper(Redactor::default());
        let err = pack::build(&req, &shipper.sink(), &CancellationToken::new())
            .await
            .unwrap_err();
        shipper.finish().await;
        assert!(matches!(err, PackError::NotInstalled { .. }), "{bin}: {err:?}");
        let message = err.to_string();
        assert!(message.contains(&format!("PACK_BIN={bin}")), "{message}");
        assert!(
            message.contains("install it from https://buildpacks.io/") && message.contains("set PACK_BIN"),
            "{message}"
        );
    }
    assert!(!image_exists(&bed.image));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_pack_reports_its_exit_code_and_last_error_line() {
    let bed = Bed::new("fail", &[("FAKE_PACK_FAIL", "1")]);
    let req = bed.request(3000, &[]);
    let shipper = bed.shipper(Redactor::default());

    let err = pack::build(&req, &shipper.sink(), &CancellationToken::new())
        .await
        .unwrap_err();
    shipper.finish().await;

    let PackError::Failed { status, last_line } = &err else {
        panic!("expected Failed, got {err:?}");
    };
    assert_eq!(status.code(), Some(1));
    assert_eq!(last_line.as_deref(), Some("ERROR: failed to build: exit status 1"));
    assert_eq!(
        err.to_string(),
        "pack build failed (exit status: 1): ERROR: failed to build: exit status 1"
    );
    assert!(!image_exists(&bed.image));
    bed.dashboard().await.assert_in_order(&[
        "===> BUILDING",
        "[builder] npm ERR! missing script: build",
        "ERROR: failed to build: exit status 1",
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_in_pack_s_last_line_is_masked_in_the_error() {
    let bed = Bed::new(
        "fail-secret",
        &[("FAKE_PACK_FAIL", "1"), ("FAKE_PACK_FAIL_SHOWS", "DB_PASSWORD")],
    );
    let secret = format!("pw-{}", bed.tb.unique("db"));
    let req = bed.request(3000, &[("DB_PASSWORD", &secret)]);
    let shipper = bed.shipper(Redactor::new([&secret]));

    let err = pack::build(&req, &shipper.sink(), &CancellationToken::new())
        .await
        .unwrap_err();
    shipper.finish().await;

    assert_eq!(
        err.to_string(),
        "pack build failed (exit status: 1): ERROR: failed to build: DB_PASSWORD=***"
    );
    assert!(!bed.dashboard().await.everything().contains(&secret));
}

/// Starts a build in a task and returns once `===> BUILDING` reached the
/// dashboard and the fake's long sleep (a child in its process group) runs.
async fn start_sleeping_build(bed: &Bed) -> (LogShipper, CancellationToken, JoinHandle<Result<(), PackError>>) {
    let req = bed.request(3000, &[("SOME", "value")]);
    let shipper = bed.shipper(Redactor::default());
    let sink = shipper.sink();
    let token = CancellationToken::new();
    let build = tokio::spawn({
        let token = token.clone();
        async move { pack::build(&req, &sink, &token).await }
    });
    let started = Instant::now();
    loop {
        let arrived = bed
            .dashboard()
            .await
            .log_lines()
            .iter()
            .any(|l| l.contains("===> BUILDING"));
        if arrived && bed.survivors().iter().any(|p| p.ends_with(" sleep 300 ")) {
            return (shipper, token, build);
        }
        assert!(!build.is_finished(), "build ended before it was stopped");
        assert!(
            started.elapsed() < common::WAIT,
            "===> BUILDING or the sleep never came"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A killed process can be seen for a moment after the signal was sent.
async fn assert_nothing_left(bed: &Bed) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut survivors = bed.survivors();
    while !survivors.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        survivors = bed.survivors();
    }
    assert!(survivors.is_empty(), "left running: {survivors:#?}");
    assert!(!bed.env_file().unwrap().exists(), "env file left behind");
    assert!(!image_exists(&bed.image));
}

/// Cancels a sleeping build; returns how long `build` took to return.
async fn cancel_during_build(bed: &Bed) -> Duration {
    let (shipper, token, build) = start_sleeping_build(bed).await;
    let cancelled_at = Instant::now();
    token.cancel();
    let result = tokio::time::timeout(TERM_GRACE * 4, build)
        .await
        .expect("build did not return after the cancel")
        .unwrap();
    let took = cancelled_at.elapsed();
    shipper.finish().await;
    assert!(matches!(result, Err(PackError::Cancelled)), "{result:?}");
    assert_nothing_left(bed).await;
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_build_kills_the_process_group() {
    let bed = Bed::new("dropped", &[("FAKE_PACK_SLEEP", "300")]);
    let (shipper, _token, build) = start_sleeping_build(&bed).await;
    build.abort();
    assert!(build.await.unwrap_err().is_cancelled());
    shipper.finish().await;
    assert_nothing_left(&bed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_whole_process_group_promptly() {
    let bed = Bed::new("cancel", &[("FAKE_PACK_SLEEP", "300")]);
    let took = cancel_during_build(&bed).await;
    assert!(took < Duration::from_secs(3), "cancel took {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pack_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let bed = Bed::new(
        "cancel-kill",
        &[("FAKE_PACK_SLEEP", "300"), ("FAKE_PACK_IGNORE_TERM", "1")],
    );
    let took = cancel_during_build(&bed).await;
    assert!(
        took >= TERM_GRACE && took < TERM_GRACE + Duration::from_secs(5),
        "cancel took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_already_cancelled_build_starts_nothing() {
    let bed = Bed::new("precancelled", &[]);
    let req = bed.request(3000, &[]);
    let shipper = bed.shipper(Redactor::default());
    let token = CancellationToken::new();
    token.cancel();
    let result = pack::build(&req, &shipper.sink(), &token).await;
    shipper.finish().await;
    assert!(matches!(result, Err(PackError::Cancelled)), "{result:?}");
    assert!(!Path::new(&bed.dir.path().join("argv")).exists());
}
