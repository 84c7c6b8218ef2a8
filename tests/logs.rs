//! Build output reaches the dashboard complete, in order, and in batches,
//! and a per-build cap ends a runaway log with one clear line.

mod common;

use common::Testbed;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_lines_arrive_in_order_in_few_calls() {
    let tb = Testbed::load();
    let repo = tb.new_repo("chatty");
    let marker = tb.unique("chatty");
    repo.write(
        "Dockerfile",
        &format!("FROM local/busybox:latest\nRUN seq 1 20000 | sed 's/^/line-/' # {marker}\n"),
    )
    .commit("chatty");
    let mut daemon = tb.start_daemon(&[]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"]);
    let numbered: Vec<u32> = dash
        .log_lines()
        .iter()
        .filter_map(|l| l.strip_prefix("line-").and_then(|n| n.parse().ok()))
        .collect();
    assert_eq!(numbered, (1..=20000).collect::<Vec<_>>(), "every line, once, in order");
    let log_calls = dash.calls.iter().filter(|c| c["kind"] == "logs").count();
    assert!(log_calls <= 200, "{log_calls} logs calls for 20,000 lines: not batched");
    // Nothing arrives after the verdict.
    let last = dash.calls.last().unwrap();
    assert_eq!(last["body"]["status"], "BUILDED");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_past_the_cap_ends_with_how_many_lines_were_omitted() {
    let tb = Testbed::load();
    let repo = tb.new_repo("runaway");
    let marker = tb.unique("runaway");
    repo.write(
        "Dockerfile",
        &format!("FROM local/busybox:latest\nRUN seq 1 50000 # {marker}\n"),
    )
    .commit("runaway");
    let mut daemon = tb.start_daemon(&[("BUILD_LOG_MAX_BYTES", "20000")]);
    let job = tb.job(&repo, json!({}));
    tb.rpush(&daemon.queue, &job.payload()).await;
    let dash = tb.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "the cap never fails a build");
    let text: usize = dash.log_lines().iter().map(|l| l.len() + 1).sum();
    assert!(text < 25_000, "{text} bytes shipped past a 20,000 byte cap");
    assert!(
        dash.log_lines().iter().any(|l| l.contains("lines omitted")),
        "no omitted-lines notice"
    );
}
