//! What an operator sees of a running builder: `/metrics` and `/healthz` on
//! METRICS_ADDR, and the notifications of systemd's Type=notify (READY,
//! STATUS, WATCHDOG, STOPPING). Real daemon, real Redis and Docker Engine;
//! the test plays Prometheus, a monitor, and systemd's notify socket.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Daemon, PrivateRedis, Testbed, WAIT};
use serde_json::{json, Value};

const STEPS: [&str; 5] = ["clone", "prepare", "registry", "build", "push"];

/// An address nothing listens on, for the daemon's METRICS_ADDR.
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get(addr: &str, path: &str) -> reqwest::Response {
    http()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

async fn health(addr: &str) -> (u16, Value) {
    let resp = get(addr, "/healthz").await;
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("/healthz answers JSON"))
}

/// One scrape of `/metrics`, checked against the OpenMetrics text format
/// Prometheus reads: every line is a descriptor, a sample of a family
/// declared before it, or the final `# EOF`.
struct Scrape {
    samples: HashMap<String, f64>,
    text: String,
}

impl Scrape {
    async fn take(addr: &str) -> Scrape {
        let resp = get(addr, "/metrics").await;
        assert_eq!(resp.status(), 200);
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(
            content_type.starts_with("application/openmetrics-text; version=1.0.0"),
            "{content_type}"
        );
        Scrape::parse(resp.text().await.unwrap())
    }

    fn parse(text: String) -> Scrape {
        let sample_re = regex::Regex::new(
            r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? (\S+)$"#,
        )
        .unwrap();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut samples = HashMap::new();
        let mut lines = text.lines();
        for line in lines.by_ref() {
            if line == "# EOF" {
                break;
            }
            if let Some(descriptor) = line.strip_prefix("# ") {
                let mut parts = descriptor.splitn(3, ' ');
                let (keyword, family, rest) = (parts.next(), parts.next(), parts.next());
                let (Some(family), Some(rest)) = (family, rest) else {
                    panic!("malformed descriptor {line:?}");
                };
                match keyword {
                    Some("TYPE") => {
                        types.insert(family.to_owned(), rest.to_owned());
                    }
                    Some("HELP" | "UNIT") => {}
                    _ => panic!("unknown descriptor {line:?}"),
                }
                continue;
            }
            let caps = sample_re
                .captures(line)
                .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
            let name = &caps[1];
            let value = match &caps[3] {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let declared = types.iter().any(|(family, kind)| match kind.as_str() {
                "counter" => name == format!("{family}_total"),
                "gauge" => name == family,
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name == format!("{family}{suffix}")),
                _ => false,
            });
            assert!(declared, "sample of an undeclared family: {line:?}");
            assert!(
                samples
                    .insert(line.rsplit_once(' ').unwrap().0.to_owned(), value)
                    .is_none(),
                "duplicate series {line:?}"
            );
        }
        assert_eq!(lines.next(), None, "lines after # EOF, or no # EOF:\n{text}");
        assert!(text.ends_with("# EOF\n"), "no # EOF at the end:\n{text}");
        Scrape { samples, text }
    }

    /// The value of a series, written as in the exposition.
    fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("{series} missing from:\n{}", self.text))
    }

    fn builds(&self, outcome: &str) -> f64 {
        self.get(&format!("deployra_builder_builds_total{{outcome=\"{outcome}\"}}"))
            .unwrap_or(0.0)
    }

    fn step_count(&self, step: &str) -> f64 {
        self.value(&format!(
            "deployra_builder_step_duration_seconds_count{{step=\"{step}\"}}"
        ))
    }
}

/// Scrapes until `condition` holds (the worker settles a job a moment after
/// the dashboard hears its verdict); returns that scrape.
async fn scrape_until(addr: &str, what: &str, daemon: &mut Daemon, condition: impl Fn(&Scrape) -> bool) -> Scrape {
    let started = Instant::now();
    loop {
        let scrape = Scrape::take(addr).await;
        if condition(&scrape) {
            return scrape;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "metrics never showed {what}:\n{}\ndaemon output:\n{}",
            scrape.text,
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn sleeper_repo(tb: &Testbed, marker: &str, seconds: u32) -> common::FixtureRepo {
    let repo = tb.new_repo(marker);
    repo.write(
        "Dockerfile",
        &format!("FROM local/busybox:latest\nRUN echo started-{marker} && sleep {seconds}\nCOPY . /app\n"),
    )
    .commit("sleeper");
    repo
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health_follow_the_builds() {
    let tb = Testbed::load();
    let addr = free_addr();
    let mut daemon = tb.start_daemon(&[("METRICS_ADDR", &addr)]);
    daemon.wait_output("deployra-builder ready").await;

    let (status, body) = health(&addr).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"status": "ok", "redis": "ok", "docker": "ok"}));

    let before = Scrape::take(&addr).await;
    assert_eq!(before.builds("builded"), 0.0);
    assert_eq!(before.value("deployra_builder_running_builds"), 0.0);
    assert_eq!(before.value("deployra_builder_last_success_timestamp_seconds"), 0.0);
    for step in STEPS {
        assert_eq!(before.step_count(step), 0.0);
    }

    // One build runs; a failing one waits behind it.
    let marker = tb.unique("metrics");
    let good = tb.job(&sleeper_repo(&tb, &marker, 5), json!({}));
    let broken_repo = tb.new_repo("metrics-fail");
    broken_repo
        .write("Dockerfile", "FROM local/busybox:latest\nRUN exit 3\n")
        .commit("fails");
    let broken = tb.job(&broken_repo, json!({}));
    tb.rpush(&daemon.queue, &good.payload()).await;
    tb.wait_log(&good.deployment_id, &format!("started-{marker}"), 1, &mut daemon)
        .await;
    tb.rpush(&daemon.queue, &broken.payload()).await;
    let busy = Scrape::take(&addr).await;
    assert_eq!(busy.value("deployra_builder_running_builds"), 1.0, "{}", busy.text);
    assert_eq!(busy.value("deployra_builder_queue_length"), 1.0, "{}", busy.text);

    let dash = tb.wait_final(&good.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    let dash = tb.wait_final(&broken.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "FAILED"], "{:#?}", dash.calls);

    let after = scrape_until(&addr, "both jobs settled", &mut daemon, |s| {
        s.builds("builded") == 1.0 && s.builds("failed") == 1.0
    })
    .await;
    assert_eq!(
        after.value("deployra_builder_build_failures_total{kind=\"build\"}"),
        1.0
    );
    assert_eq!(after.builds("cancelled") + after.builds("interrupted"), 0.0);
    assert_eq!(after.value("deployra_builder_build_duration_seconds_count"), 2.0);
    // Both jobs fetched, prepared and found their repository; only the good
    // one got past its build to a push.
    for step in ["clone", "prepare", "registry", "build"] {
        assert_eq!(after.step_count(step), 2.0, "{step}:\n{}", after.text);
    }
    assert_eq!(after.step_count("push"), 1.0);
    assert!(
        after.value("deployra_builder_step_duration_seconds_sum{step=\"build\"}") >= 5.0,
        "the sleeper's build step took at least 5 s:\n{}",
        after.text
    );
    assert_eq!(
        after.value("deployra_builder_step_duration_seconds_bucket{le=\"+Inf\",step=\"push\"}"),
        1.0
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let last_success = after.value("deployra_builder_last_success_timestamp_seconds");
    assert!(
        last_success > now - 600.0 && last_success <= now,
        "{last_success} vs {now}"
    );
    assert_eq!(after.value("deployra_builder_running_builds"), 0.0);
    assert_eq!(
        after.value("deployra_builder_dashboard_report_failures_total{call=\"status\"}"),
        0.0
    );
    assert_eq!(Scrape::take(&addr).await.value("deployra_builder_queue_length"), 0.0);

    assert_eq!(get(&addr, "/nothing").await.status(), 404);
    let post = http().post(format!("http://{addr}/metrics")).send().await.unwrap();
    assert_eq!(post.status(), 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_names_an_unreachable_redis_and_recovers_with_it() {
    let tb = Testbed::load();
    let mut redis = PrivateRedis::start();
    let port = redis.port.to_string();
    let addr = free_addr();
    let mut daemon = tb.start_daemon(&[("REDIS_PORT", &port), ("METRICS_ADDR", &addr)]);
    daemon.wait_output("deployra-builder ready").await;
    assert_eq!(health(&addr).await.0, 200);

    redis.stop();
    let started = Instant::now();
    let body = loop {
        let asked = Instant::now();
        let (status, body) = health(&addr).await;
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "/healthz took {:?} with Redis down",
            asked.elapsed()
        );
        if status == 503 {
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "/healthz still {status} {body} with Redis stopped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["docker"], "ok", "{body}");
    assert!(body["redis"].as_str().unwrap().starts_with("failed: "), "{body}");

    // A scrape is not held up by the missing Redis either.
    let asked = Instant::now();
    Scrape::take(&addr).await;
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "/metrics took {:?}",
        asked.elapsed()
    );

    redis.restart();
    let started = Instant::now();
    loop {
        let (status, body) = health(&addr).await;
        if status == 200 {
            assert_eq!(body, json!({"status": "ok", "redis": "ok", "docker": "ok"}));
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "/healthz still {status} {body} after Redis came back:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_answers_while_redis_is_awaited_at_start() {
    let tb = Testbed::load();
    let mut redis = PrivateRedis::start();
    redis.stop();
    let port = redis.port.to_string();
    let addr = free_addr();
    let mut daemon = tb.start_daemon(&[("REDIS_PORT", &port), ("METRICS_ADDR", &addr)]);
    daemon.wait_output("cannot connect to Redis; retrying").await;
    let (status, body) = health(&addr).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        json!({"status": "unavailable", "redis": "failed: not connected yet", "docker": "ok"})
    );
    Scrape::take(&addr).await;

    redis.restart();
    daemon.wait_output("deployra-builder ready").await;
    assert_eq!(health(&addr).await.0, 200);
}

/// What the daemon sent to its NOTIFY_SOCKET, one entry per `KEY=value`
/// line, in arrival order.
#[derive(Clone, Default)]
struct Notifications(Arc<Mutex<Vec<String>>>);

impl Notifications {
    fn listen(socket: tokio::net::UnixDatagram) -> Notifications {
        let received = Notifications::default();
        let log = received.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut log = log.0.lock().unwrap();
                log.extend(text.lines().map(str::to_owned));
            }
        });
        received
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|l| *l == line).count()
    }

    async fn wait_for(&self, line: &str, daemon: &mut Daemon) {
        let started = Instant::now();
        while !self.lines().iter().any(|l| l == line) {
            assert!(
                started.elapsed() < WAIT,
                "{line:?} never sent; got {:?}\ndaemon output:\n{}",
                self.lines(),
                daemon.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_status_watchdog_and_stopping() {
    let tb = Testbed::load();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let notifications = Notifications::listen(tokio::net::UnixDatagram::bind(&socket_path).unwrap());
    let mut daemon = tb.start_daemon(&[
        ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "2000000"),
    ]);

    notifications.wait_for("READY=1", &mut daemon).await;
    assert!(daemon.output().contains("deployra-builder ready"));
    assert_eq!(notifications.count("STATUS=idle"), 1, "{:?}", notifications.lines());

    // A 2 s watchdog is pinged every second or so.
    let pings = notifications.count("WATCHDOG=1");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let more = notifications.count("WATCHDOG=1") - pings;
    assert!(
        (2..=6).contains(&more),
        "{more} pings in 3.5 s: {:?}",
        notifications.lines()
    );

    let marker = tb.unique("notify");
    let job = tb.job(&sleeper_repo(&tb, &marker, 2), json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    notifications
        .wait_for(&format!("STATUS=building 1: {}", job.deployment_id), &mut daemon)
        .await;
    tb.wait_final(&job.deployment_id, &mut daemon).await;
    let started = Instant::now();
    while notifications.count("STATUS=idle") < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "STATUS never went back to idle: {:?}",
            notifications.lines()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    daemon.signal("TERM");
    let status = daemon.wait_exit().await;
    assert!(status.success(), "exit status {status}:\n{}", daemon.output());
    let lines = notifications.lines();
    let stopping = lines
        .iter()
        .position(|l| l == "STOPPING=1")
        .unwrap_or_else(|| panic!("no STOPPING=1: {lines:?}"));
    let ready = lines.iter().position(|l| l == "READY=1").unwrap();
    assert!(ready < stopping, "{lines:?}");
    assert!(
        lines
            .iter()
            .skip(ready)
            .take_while(|l| *l != "STOPPING=1")
            .filter(|l| *l == "WATCHDOG=1")
            .count()
            >= 4,
        "the watchdog kept being pinged while the builder ran: {lines:?}"
    );
}
