//! What happens to a job when it is cancelled, runs too long, shares the
//! builder, is interrupted by a crash, a shutdown or a Redis restart, meets
//! a failing dashboard, or is queued twice. Real daemon, real Redis, real
//! Docker Engine; every wait is on an event, with a generous bound.

mod common;

use std::time::Duration;

use common::{build_steps_with, wait_until, Daemon, PrivateRedis, Testbed};
use serde_json::json;

/// A Dockerfile whose second step prints a marker and then runs for a long
/// time (or `seconds`), so tests can act while it runs. The waiting shell
/// carries the marker in its command line for as long as the step runs
/// (a shell whose last command is `sleep` may become `sleep` itself).
fn sleeper(marker: &str, seconds: u32) -> String {
    format!(
        "FROM local/busybox:latest\nRUN echo started-{marker} && sh -c 'sleep {seconds}; true' {marker}\nCOPY . /app\n"
    )
}

fn sleeper_repo(tb: &Testbed, marker: &str, seconds: u32) -> common::FixtureRepo {
    let repo = tb.new_repo(marker);
    repo.write("Dockerfile", &sleeper(marker, seconds)).commit("sleeper");
    repo
}

async fn wait_build_steps_gone(marker: &str) {
    wait_until(&format!("no build step of {marker} is left running"), || {
        build_steps_with(marker).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_running_build_stops_it_inside_docker() {
    let tb = Testbed::load();
    let marker = tb.unique("cancel-running");
    let repo = sleeper_repo(&tb, &marker, 300);
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    tb.wait_log(&job.deployment_id, &format!("started-{marker}"), 1, &mut daemon)
        .await;
    assert!(
        !build_steps_with(&marker).is_empty(),
        "the build step should be running"
    );

    tb.publish_cancel(&job.deployment_id).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "CANCELLED"], "{:#?}", dash.calls);
    wait_build_steps_gone(&marker).await;
    let tags = tb.registry_get(&format!("deployra/{}/tags/list", job.service_id)).await;
    assert_eq!(tags.status(), 404, "nothing of a cancelled build is pushed");
    // The daemon goes on: the next job builds.
    let next = tb.new_repo("after-cancel");
    next.write("Dockerfile", "FROM local/busybox:latest\nCOPY . /app\n")
        .commit("c");
    let next = tb.job(&next, json!({}));
    tb.rpush(&daemon.queue, &next.payload()).await;
    assert_eq!(
        tb.wait_final(&next.deployment_id, &mut daemon).await.statuses(),
        ["BUILDING", "BUILDED"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_cancelled_while_queued_is_not_built() {
    let tb = Testbed::load();
    let marker = tb.unique("busy");
    let busy = sleeper_repo(&tb, &marker, 300);
    let waiting = tb.new_repo("queued");
    waiting
        .write("Dockerfile", "FROM local/busybox:latest\nRUN echo must-not-run\n")
        .commit("c");
    let mut daemon = tb.start_daemon(&[]);
    let first = tb.job(&busy, json!({}));
    let second = tb.job(&waiting, json!({}));
    tb.rpush(&daemon.queue, &first.payload()).await;
    tb.rpush(&daemon.queue, &second.payload()).await;
    tb.wait_log(&first.deployment_id, &format!("started-{marker}"), 1, &mut daemon)
        .await;

    tb.publish_cancel(&second.deployment_id).await;
    // Give the cancel time to be recorded before the slot frees up.
    let mut redis = tb.redis().await;
    let marker_key = format!("{}:cancelled:{}", daemon.queue, second.deployment_id);
    let started = std::time::Instant::now();
    while !redis::cmd("EXISTS")
        .arg(&marker_key)
        .query_async::<bool>(&mut redis)
        .await
        .unwrap()
    {
        assert!(started.elapsed() < common::WAIT, "the cancel was never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tb.publish_cancel(&first.deployment_id).await;

    let dash = tb.wait_final(&second.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["CANCELLED"], "{:#?}", dash.calls);
    dash.assert_in_order(&["Cancelled while queued"]);
    assert!(!dash.log_lines().iter().any(|l| l.contains("must-not-run")));
    assert_eq!(
        tb.wait_final(&first.deployment_id, &mut daemon).await.statuses(),
        ["BUILDING", "CANCELLED"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_past_its_timeout_fails_and_stops() {
    let tb = Testbed::load();
    let marker = tb.unique("timeout");
    let repo = sleeper_repo(&tb, &marker, 300);
    let mut daemon = tb.start_daemon(&[("BUILD_TIMEOUT_SECS", "4")]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "FAILED"], "{:#?}", dash.calls);
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(
        error.contains("timed out") && error.contains("BUILD_TIMEOUT_SECS"),
        "{error}"
    );
    wait_build_steps_gone(&marker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_builds_overlap_and_a_cancel_reaches_only_its_own() {
    let tb = Testbed::load();
    let long_marker = tb.unique("long");
    let short_marker = tb.unique("short");
    let long = sleeper_repo(&tb, &long_marker, 300);
    let short = sleeper_repo(&tb, &short_marker, 5);
    let mut daemon = tb.start_daemon(&[("BUILD_CONCURRENCY", "2")]);
    let a = tb.job(&long, json!({}));
    let b = tb.job(&short, json!({}));
    tb.rpush(&daemon.queue, &a.payload()).await;
    tb.rpush(&daemon.queue, &b.payload()).await;
    // Both steps run at the same time.
    tb.wait_log(&a.deployment_id, &format!("started-{long_marker}"), 1, &mut daemon)
        .await;
    tb.wait_log(&b.deployment_id, &format!("started-{short_marker}"), 1, &mut daemon)
        .await;
    assert!(!build_steps_with(&long_marker).is_empty() && !build_steps_with(&short_marker).is_empty());

    tb.publish_cancel(&a.deployment_id).await;
    let dash_a = tb.wait_final(&a.deployment_id, &mut daemon).await;
    assert_eq!(dash_a.statuses(), ["BUILDING", "CANCELLED"]);
    let dash_b = tb.wait_final(&b.deployment_id, &mut daemon).await;
    assert_eq!(dash_b.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash_b.calls);
    wait_build_steps_gone(&long_marker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_builder_killed_mid_build_loses_nothing() {
    let tb = Testbed::load();
    let marker = tb.unique("sigkill");
    let repo = sleeper_repo(&tb, &marker, 3);
    let mut first = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&first.queue, &job.payload()).await;
    tb.wait_log(&job.deployment_id, &format!("started-{marker}"), 1, &mut first)
        .await;
    first.signal("KILL");
    first.wait_exit().await;
    assert_eq!(
        tb.lrange(&format!("{}:processing:{}", first.queue, first.worker_id))
            .await,
        [job.payload()]
    );

    // systemd restarts it: same queue, same worker id.
    let mut second = tb.start_daemon_on(&first.queue, &first.worker_id, &[]);
    let dash = tb.wait_final(&job.deployment_id, &mut second).await;
    assert_eq!(
        dash.statuses(),
        ["BUILDING", "BUILDING", "BUILDED"],
        "{:#?}",
        dash.calls
    );
    assert!(tb.lrange(&first.queue).await.is_empty());
    assert!(tb
        .lrange(&format!("{}:processing:{}", first.queue, first.worker_id))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn another_builder_takes_over_the_jobs_of_a_dead_one() {
    let tb = Testbed::load();
    let marker = tb.unique("orphan");
    let repo = sleeper_repo(&tb, &marker, 2);
    let mut dead = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&dead.queue, &job.payload()).await;
    tb.wait_log(&job.deployment_id, &format!("started-{marker}"), 1, &mut dead)
        .await;
    dead.signal("KILL");
    dead.wait_exit().await;

    // A different host: it recovers the job once the dead one's heartbeat expires.
    let mut other = tb.start_daemon_on(&dead.queue, &tb.unique("other-worker"), &[]);
    let dash = tb.wait_final(&job.deployment_id, &mut other).await;
    assert_eq!(
        dash.statuses(),
        ["BUILDING", "BUILDING", "BUILDED"],
        "{:#?}",
        dash.calls
    );
    assert!(other.output().contains("put jobs of stopped builders back"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_keeps_killing_its_builder_is_failed_after_three_tries() {
    let tb = Testbed::load();
    let marker = tb.unique("crashy");
    let repo = sleeper_repo(&tb, &marker, 300);
    let queue = tb.unique("test-queue");
    let worker = tb.unique("worker");
    let job = tb.job(&repo, json!({}));
    tb.rpush(&queue, &job.payload()).await;
    for attempt in 1..=3 {
        let mut daemon = tb.start_daemon_on(&queue, &worker, &[]);
        tb.wait_log(&job.deployment_id, &format!("started-{marker}"), attempt, &mut daemon)
            .await;
        daemon.signal("KILL");
        daemon.wait_exit().await;
    }
    let mut daemon = tb.start_daemon_on(&queue, &worker, &[]);
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(
        dash.statuses(),
        ["BUILDING", "BUILDING", "BUILDING", "FAILED"],
        "{:#?}",
        dash.calls
    );
    let error = dash.final_status()["error"].as_str().unwrap();
    assert!(error.starts_with("interrupted 3 times"), "{error}");
    wait_build_steps_gone(&marker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_running_build_finish() {
    let tb = Testbed::load();
    let marker = tb.unique("drain");
    let repo = sleeper_repo(&tb, &marker, 3);
    let mut daemon = tb.start_daemon(&[("SHUTDOWN_GRACE_SECS", "240")]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    tb.wait_log(&job.deployment_id, &format!("started-{marker}"), 1, &mut daemon)
        .await;
    daemon.signal("TERM");
    let status = daemon.wait_exit().await;
    assert!(status.success(), "exit status {status}:\n{}", daemon.output());
    let dash = common::Dashboard {
        calls: tb.calls(&job.deployment_id).await,
    };
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_past_the_grace_puts_the_build_back_in_the_queue() {
    let tb = Testbed::load();
    let marker = tb.unique("requeue");
    let repo = sleeper_repo(&tb, &marker, 300);
    let mut daemon = tb.start_daemon(&[("SHUTDOWN_GRACE_SECS", "1")]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    tb.wait_log(&job.deployment_id, &format!("started-{marker}"), 1, &mut daemon)
        .await;
    daemon.signal("TERM");
    let status = daemon.wait_exit().await;
    assert!(status.success(), "exit status {status}:\n{}", daemon.output());

    let dash = common::Dashboard {
        calls: tb.calls(&job.deployment_id).await,
    };
    assert_eq!(
        dash.statuses(),
        ["BUILDING"],
        "no final status for a requeued build: {:#?}",
        dash.calls
    );
    dash.assert_in_order(&["builder is restarting"]);
    assert_eq!(
        tb.lrange(&daemon.queue).await,
        [job.payload()],
        "the job is back at the head of the queue"
    );
    wait_build_steps_gone(&marker).await;

    // The next builder starts it again; cancel it to finish quickly.
    let mut next = tb.start_daemon_on(&daemon.queue, &tb.unique("worker"), &[]);
    tb.wait_log(&job.deployment_id, &format!("started-{marker}"), 2, &mut next)
        .await;
    tb.publish_cancel(&job.deployment_id).await;
    let dash = tb.wait_final(&job.deployment_id, &mut next).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDING", "CANCELLED"]);
}

async fn lrange_on(redis: &PrivateRedis, key: &str) -> Vec<String> {
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut redis.conn().await)
        .await
        .unwrap()
}

async fn rpush_on(redis: &PrivateRedis, queue: &str, payload: &str) {
    let _: i64 = redis::cmd("RPUSH")
        .arg(queue)
        .arg(payload)
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restart_is_survived_idle_and_mid_build() {
    let tb = Testbed::load();
    let mut redis = PrivateRedis::start();
    let port = redis.port.to_string();
    let mut daemon = tb.start_daemon(&[("REDIS_PORT", &port)]);
    daemon.wait_output("deployra-builder ready").await;

    // Idle: restart, then a job still arrives and builds.
    redis.restart();
    let marker = tb.unique("redis-restart");
    let repo = sleeper_repo(&tb, &marker, 4);
    let job = tb.job(&repo, json!({}));
    rpush_on(&redis, &daemon.queue, &job.payload()).await;
    // Mid-build: restart while the step runs.
    tb.wait_log(&job.deployment_id, &format!("started-{marker}"), 1, &mut daemon)
        .await;
    redis.restart();
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    let processing = format!("{}:processing:{}", daemon.queue, daemon.worker_id);
    wait_until_empty(&redis, &processing).await;
    assert!(lrange_on(&redis, &daemon.queue).await.is_empty());

    // The cancel subscription came back too.
    let long_marker = tb.unique("after-restart");
    let long = sleeper_repo(&tb, &long_marker, 300);
    let job = tb.job(&long, json!({}));
    rpush_on(&redis, &daemon.queue, &job.payload()).await;
    tb.wait_log(&job.deployment_id, &format!("started-{long_marker}"), 1, &mut daemon)
        .await;
    tb.publish_cancel_on(&mut redis.conn().await, &job.deployment_id).await;
    assert_eq!(
        tb.wait_final(&job.deployment_id, &mut daemon).await.statuses(),
        ["BUILDING", "CANCELLED"]
    );

    // Two outages, logged as outages, not once per retry.
    let complaints = daemon.output().lines().filter(|l| l.contains("ERROR")).count();
    assert!(
        complaints <= 6,
        "too many error lines for two restarts:\n{}",
        daemon.output()
    );
}

async fn wait_until_empty(redis: &PrivateRedis, key: &str) {
    let started = std::time::Instant::now();
    while !lrange_on(redis, key).await.is_empty() {
        assert!(started.elapsed() < common::WAIT, "{key} never emptied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fail_next_calls(tb: &Testbed, deployment_id: &str, count: u32, status: u16) {
    let url = format!("{}/_testbed/fail", tb.get("TESTBED_DASHBOARD_URL"));
    let resp = reqwest::Client::new()
        .post(url)
        .json(&json!({ "deploymentId": deployment_id, "count": count, "status": status }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_error_answer_from_the_dashboard_is_not_read_whole() {
    let tb = Testbed::load();
    let repo = tb.new_repo("huge-answer");
    repo.write("Dockerfile", "FROM local/busybox:latest\nCOPY . /app\n")
        .commit("c");
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({}));
    // BUILDING is answered 400 with 256 MiB of body.
    let url = format!("{}/_testbed/fail", tb.get("TESTBED_DASHBOARD_URL"));
    let resp = reqwest::Client::new()
        .post(url)
        .json(&json!({ "deploymentId": job.deployment_id, "status": 400, "bodyBytes": 256u64 << 20 }))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
    assert!(
        daemon.output().contains("could not report BUILDING"),
        "{}",
        daemon.output()
    );
    let peak = daemon.peak_memory_kib();
    assert!(peak < 128 * 1024, "peak memory {peak} KiB: the body was read whole");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_dashboard_is_retried_and_never_fails_the_build() {
    let tb = Testbed::load();
    let repo = tb.new_repo("flaky-dashboard");
    repo.write(
        "Dockerfile",
        "FROM local/busybox:latest\nRUN echo output\nCOPY . /app\n",
    )
    .commit("c");
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({}));
    fail_next_calls(&tb, &job.deployment_id, 3, 503).await;
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    let failed = dash.calls.iter().filter(|c| c["answered"] == 503).count();
    assert_eq!(failed, 3, "{:#?}", dash.calls);
    let accepted: Vec<_> = dash
        .calls
        .iter()
        .filter(|c| c["kind"] == "status" && c["answered"] == 200)
        .map(|c| c["body"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(accepted, ["BUILDING", "BUILDED"]);
    dash.assert_in_order(&["output", "Image pushed"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_api_key_is_a_loud_error_in_the_journal() {
    let tb = Testbed::load();
    let repo = tb.new_repo("wrong-key");
    repo.write("Dockerfile", "FROM local/busybox:latest\n").commit("c");
    let mut daemon = tb.start_daemon(&[("API_KEY", "not-the-key")]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    daemon.wait_output("rejected the API key (401); check API_KEY").await;
    assert!(!daemon.output().contains("not-the-key"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_queued_twice_is_built_once() {
    let tb = Testbed::load();
    let marker = tb.unique("dup");
    let repo = sleeper_repo(&tb, &marker, 2);
    let mut daemon = tb.start_daemon(&[("BUILD_CONCURRENCY", "2")]);
    let job = tb.job(&repo, json!({}));
    // Twice at once (the second is taken while the first runs) ...
    tb.rpush(&daemon.queue, &job.payload()).await;
    tb.rpush(&daemon.queue, &job.payload()).await;
    tb.wait_final(&job.deployment_id, &mut daemon).await;
    // ... and once more after it was built.
    tb.rpush(&daemon.queue, &job.payload()).await;
    let processing = format!("{}:processing:{}", daemon.queue, daemon.worker_id);
    wait_for_two_duplicates(&daemon).await;
    assert!(tb.lrange(&daemon.queue).await.is_empty());
    assert!(tb.lrange(&processing).await.is_empty());
    let dash = common::Dashboard {
        calls: tb.calls(&job.deployment_id).await,
    };
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{:#?}", dash.calls);
}

async fn wait_for_two_duplicates(daemon: &Daemon) {
    let started = std::time::Instant::now();
    while daemon.output().matches("dropped").count() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "duplicates not dropped:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
