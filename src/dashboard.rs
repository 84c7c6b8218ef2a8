//! The dashboard API client (CONTRACT section 3): statuses, and build output
//! shipped in batches.
//!
//! Reporting must never be what fails or slows a build. Status calls are
//! retried with backoff through 5xx answers, timeouts and refused
//! connections; build output is buffered in memory (bounded) and shipped by
//! a [`LogShipper`] task, several lines per call, in order, while the build
//! goes on.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::redact::{Redactor, Secret};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Building,
    Builded,
    Failed,
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LogType {
    Info,
    Stdout,
    Stderr,
    Error,
}

#[derive(Debug, Serialize)]
pub struct LogLine {
    pub text: String,
    #[serde(rename = "type")]
    pub kind: LogType,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageData {
    pub container_image_uri: String,
    pub container_registry_type: &'static str,
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<LogLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<ImageData>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("dashboard rejected the API key (401); check API_KEY")]
    Unauthorized,
    #[error("dashboard does not know deployment {0} (404)")]
    UnknownDeployment(String),
    #[error("dashboard answered {status}: {body}")]
    Rejected { status: StatusCode, body: String },
    #[error("dashboard unreachable after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: String },
}

/// How hard to try before giving up on one call.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Statuses drive the rollout; they get minutes of retries.
    pub const STATUS: RetryPolicy = RetryPolicy {
        attempts: 12,
        first_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(30),
    };
    /// A log batch is retried briefly; the build does not wait for it.
    pub const LOGS: RetryPolicy = RetryPolicy {
        attempts: 5,
        first_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(5),
    };
}

#[derive(Clone)]
pub struct Dashboard {
    http: reqwest::Client,
    base: Url,
    api_key: Secret,
    metrics: Option<Metrics>,
}

impl Dashboard {
    pub fn new(base: Url, api_key: Secret) -> Result<Dashboard, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("deployra-builder/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Dashboard {
            http,
            base,
            api_key,
            metrics: None,
        })
    }

    /// Counts the calls that fail for good in `metrics`.
    pub fn with_metrics(self, metrics: Metrics) -> Dashboard {
        Dashboard {
            metrics: Some(metrics),
            ..self
        }
    }

    pub async fn status(&self, deployment_id: &str, report: &StatusReport) -> Result<(), ReportError> {
        self.post(deployment_id, "status", report, RetryPolicy::STATUS).await
    }

    pub async fn logs(&self, deployment_id: &str, line: &LogLine, policy: RetryPolicy) -> Result<(), ReportError> {
        self.post(deployment_id, "logs", line, policy).await
    }

    fn endpoint(&self, deployment_id: &str, what: &str) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("API_URL was validated as an http(s) URL")
            .extend(["webhooks", "deployments", deployment_id, what]);
        url
    }

    async fn post<B: Serialize + ?Sized>(
        &self,
        deployment_id: &str,
        what: &'static str,
        body: &B,
        policy: RetryPolicy,
    ) -> Result<(), ReportError> {
        let result = self.deliver(deployment_id, what, body, policy).await;
        if let (Err(_), Some(metrics)) = (&result, &self.metrics) {
            metrics.report_failed(what);
        }
        result
    }

    async fn deliver<B: Serialize + ?Sized>(
        &self,
        deployment_id: &str,
        what: &str,
        body: &B,
        policy: RetryPolicy,
    ) -> Result<(), ReportError> {
        let url = self.endpoint(deployment_id, what);
        let mut delay = policy.first_delay;
        let mut last = String::new();
        for attempt in 1..=policy.attempts {
            let sent = self
                .http
                .post(url.clone())
                .header("x-api-key", self.api_key.expose())
                .json(body)
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => {
                    let status = resp.status();
                    match status {
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(ReportError::Unauthorized),
                        StatusCode::NOT_FOUND => return Err(ReportError::UnknownDeployment(deployment_id.to_owned())),
                        s if s.is_server_error()
                            || s == StatusCode::TOO_MANY_REQUESTS
                            || s == StatusCode::REQUEST_TIMEOUT =>
                        {
                            last = format!("HTTP {status}");
                        }
                        _ => {
                            let body = body_prefix(resp).await;
                            return Err(ReportError::Rejected {
                                status,
                                body: body.chars().take(200).collect(),
                            });
                        }
                    }
                }
                Err(e) => last = describe_transport_error(&e),
            }
            if attempt < policy.attempts {
                tracing::debug!(what, attempt, error = %last, "dashboard call failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(policy.max_delay);
            }
        }
        Err(ReportError::GaveUp {
            attempts: policy.attempts,
            last,
        })
    }
}

fn describe_transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        // reqwest's Display includes the URL, which holds no secret.
        e.to_string()
    }
}

/// How much of an error answer's body is read: its first 200 characters
/// are kept, and a body of any size must not be held whole for them.
const MAX_ERROR_BODY: usize = 4096;

async fn body_prefix(mut resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match resp.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY - body.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// Limits of one log call and of one build's whole output.
#[derive(Clone, Copy, Debug)]
pub struct ShipperLimits {
    pub flush_interval: Duration,
    pub max_batch_bytes: usize,
    pub max_build_bytes: usize,
}

impl Default for ShipperLimits {
    fn default() -> Self {
        ShipperLimits {
            flush_interval: Duration::from_millis(250),
            max_batch_bytes: 64 * 1024,
            max_build_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Default)]
struct Pending {
    lines: VecDeque<(LogType, String)>,
    accepted_bytes: usize,
    omitted_lines: u64,
    closed: bool,
}

/// The build's side of a [`LogShipper`]: appending never blocks and never
/// fails; past the per-build cap, lines are counted and dropped.
#[derive(Clone)]
pub struct LogSink {
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    redactor: Arc<Redactor>,
    max_build_bytes: usize,
}

impl LogSink {
    pub fn line(&self, kind: LogType, text: &str) {
        let text = self.redactor.redact(text);
        let mut pending = self.pending.lock().expect("log buffer lock poisoned");
        if pending.accepted_bytes + text.len() > self.max_build_bytes {
            pending.omitted_lines += 1;
            return;
        }
        pending.accepted_bytes += text.len() + 1;
        pending.lines.push_back((kind, text));
    }

    pub fn info(&self, text: &str) {
        self.line(LogType::Info, text);
    }
}

/// Where a [`LogShipper`] delivers: the daemon's builds go to the
/// dashboard; `deployra-builder build` has no dashboard and a person
/// watching the terminal instead.
enum Destination {
    Dashboard {
        // Boxed: the HTTP client is large and the terminal variant empty.
        dashboard: Box<Dashboard>,
        deployment_id: String,
    },
    Terminal,
}

/// Ships one deployment's output to the dashboard in order, batching lines
/// of the same type into one call.
pub struct LogShipper {
    sink: LogSink,
    task: JoinHandle<()>,
}

impl LogShipper {
    pub fn start(dashboard: Dashboard, deployment_id: String, redactor: Redactor, limits: ShipperLimits) -> LogShipper {
        let destination = Destination::Dashboard {
            dashboard: Box::new(dashboard),
            deployment_id,
        };
        LogShipper::with_destination(destination, redactor, limits)
    }

    /// Prints the output as it comes (standard output, and standard error
    /// for the STDERR and ERROR lines), redacted like the dashboard's copy,
    /// with no size cap: a local build's reader wants all of it.
    pub fn to_terminal(redactor: Redactor) -> LogShipper {
        let limits = ShipperLimits {
            flush_interval: Duration::from_millis(50),
            max_build_bytes: usize::MAX,
            ..ShipperLimits::default()
        };
        LogShipper::with_destination(Destination::Terminal, redactor, limits)
    }

    fn with_destination(destination: Destination, redactor: Redactor, limits: ShipperLimits) -> LogShipper {
        let sink = LogSink {
            pending: Arc::new(Mutex::new(Pending::default())),
            wake: Arc::new(Notify::new()),
            redactor: Arc::new(redactor),
            max_build_bytes: limits.max_build_bytes,
        };
        let task = tokio::spawn(ship(destination, sink.clone(), limits));
        LogShipper { sink, task }
    }

    pub fn sink(&self) -> LogSink {
        self.sink.clone()
    }

    /// Delivers everything logged so far (plus a line counting what the cap
    /// omitted), then stops. Call before sending a final status, so the user
    /// sees the output before the verdict.
    pub async fn finish(self) {
        {
            let mut pending = self.sink.pending.lock().expect("log buffer lock poisoned");
            if pending.omitted_lines > 0 {
                let note = format!(
                    "[deployra-builder] {} lines omitted: this build's output exceeded the {} byte limit",
                    pending.omitted_lines, self.sink.max_build_bytes
                );
                pending.lines.push_back((LogType::Info, note));
            }
            pending.closed = true;
        }
        self.sink.wake.notify_one();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "log shipper task failed");
        }
    }
}

async fn ship(destination: Destination, sink: LogSink, limits: ShipperLimits) {
    loop {
        let (mut lines, closed) = {
            let mut pending = sink.pending.lock().expect("log buffer lock poisoned");
            (std::mem::take(&mut pending.lines), pending.closed)
        };
        match &destination {
            Destination::Dashboard {
                dashboard,
                deployment_id,
            } => {
                for batch in take_batches(&mut lines, limits.max_batch_bytes) {
                    if let Err(e) = dashboard.logs(deployment_id, &batch, RetryPolicy::LOGS).await {
                        tracing::warn!(deployment_id, error = %e, "build output lost: a log batch could not be delivered");
                    }
                }
            }
            Destination::Terminal => print_lines(lines),
        }
        if closed && sink.pending.lock().expect("log buffer lock poisoned").lines.is_empty() {
            return;
        }
        tokio::select! {
            _ = sink.wake.notified() => {}
            _ = tokio::time::sleep(limits.flush_interval) => {}
        }
    }
}

/// Writes to the terminal; a closed pipe (`build ... | head`) only loses
/// the output, never the build.
fn print_lines(lines: VecDeque<(LogType, String)>) {
    use std::io::Write;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    for (kind, text) in lines {
        let _ = match kind {
            LogType::Stderr | LogType::Error => writeln!(err, "{text}"),
            LogType::Info | LogType::Stdout => writeln!(out, "{text}"),
        };
    }
    let _ = out.flush();
}

/// Joins consecutive lines of one type into calls of at most `max_bytes`
/// (a single longer line goes alone).
fn take_batches(lines: &mut VecDeque<(LogType, String)>, max_bytes: usize) -> Vec<LogLine> {
    let mut batches: Vec<LogLine> = Vec::new();
    while let Some((kind, text)) = lines.pop_front() {
        match batches.last_mut() {
            Some(last) if last.kind == kind && last.text.len() + 1 + text.len() <= max_bytes => {
                last.text.push('\n');
                last.text.push_str(&text);
            }
            _ => batches.push(LogLine { text, kind }),
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(items: &[(LogType, &str)]) -> VecDeque<(LogType, String)> {
        items.iter().map(|(k, t)| (*k, t.to_string())).collect()
    }

    #[test]
    fn batches_keep_order_and_split_on_type_and_size() {
        let mut q = lines(&[
            (LogType::Stdout, "a"),
            (LogType::Stdout, "b"),
            (LogType::Info, "i"),
            (LogType::Stdout, "c"),
            (LogType::Stdout, "dddd"),
        ]);
        let batches = take_batches(&mut q, 6);
        let got: Vec<(LogType, &str)> = batches.iter().map(|b| (b.kind, b.text.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (LogType::Stdout, "a\nb"),
                (LogType::Info, "i"),
                (LogType::Stdout, "c\ndddd"),
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn an_oversized_line_goes_alone() {
        let mut q = lines(&[
            (LogType::Stdout, "x"),
            (LogType::Stdout, "0123456789"),
            (LogType::Stdout, "y"),
        ]);
        let got: Vec<String> = take_batches(&mut q, 4).into_iter().map(|b| b.text).collect();
        assert_eq!(got, vec!["x", "0123456789", "y"]);
    }

    #[test]
    fn status_report_serialises_as_the_contract_says() {
        let report = StatusReport {
            status: Status::Builded,
            logs: Some(LogLine {
                text: "done".into(),
                kind: LogType::Info,
            }),
            error: None,
            data: Some(ImageData {
                container_image_uri: "r@sha256:ab".into(),
                container_registry_type: "ecr",
            }),
        };
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            serde_json::json!({
                "status": "BUILDED",
                "logs": {"text": "done", "type": "INFO"},
                "data": {"containerImageUri": "r@sha256:ab", "containerRegistryType": "ecr"}
            })
        );
    }
}
