//! What the builder counts for Prometheus. The metrics always exist and are
//! cheap to update, whether or not `METRICS_ADDR` serves them, so the code
//! that updates them never asks whether anyone is looking.
//!
//! Every name starts with `deployra_builder_`. Label values come from fixed
//! sets (outcomes, failure kinds, step names, dashboard calls), never from a
//! job, so the number of series stays small however many deployments go
//! through.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::pipeline::Outcome;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Outcomes a job can end with on this builder; listed so that each series
/// exists at 0 from the start, which `rate()` and `increase()` need.
const OUTCOMES: [&str; 4] = ["builded", "failed", "cancelled", "interrupted"];
const STEPS: [&str; 5] = ["clone", "prepare", "registry", "build", "push"];
const DASHBOARD_CALLS: [&str; 2] = ["status", "logs"];

/// Whole jobs: from a few seconds (a cached Dockerfile) to the one-hour
/// default of BUILD_TIMEOUT_SECS.
const BUILD_BUCKETS: [f64; 12] = [
    5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
];
/// Steps: `prepare` takes milliseconds, `build` can take most of an hour.
const STEP_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabel {
    call: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Handles on every metric plus the registry that exposes them; clones
/// share the same values.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    builds: Family<OutcomeLabel, Counter>,
    failures: Family<KindLabel, Counter>,
    build_duration: Histogram,
    step_duration: HistogramFamily<StepLabel>,
    running: Gauge,
    queue_length: Gauge,
    report_failures: Family<CallLabel, Counter>,
    last_success: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let builds = Family::<OutcomeLabel, Counter>::default();
        let failures = Family::<KindLabel, Counter>::default();
        let build_duration = Histogram::new(BUILD_BUCKETS);
        let step_duration: HistogramFamily<StepLabel> = Family::new_with_constructor(|| Histogram::new(STEP_BUCKETS));
        let running = Gauge::default();
        let queue_length = Gauge::default();
        let report_failures = Family::<CallLabel, Counter>::default();
        let last_success = Gauge::<f64, AtomicU64>::default();
        for outcome in OUTCOMES {
            let _ = builds.get_or_create(&OutcomeLabel { outcome });
        }
        for step in STEPS {
            let _ = step_duration.get_or_create(&StepLabel { step });
        }
        for call in DASHBOARD_CALLS {
            let _ = report_failures.get_or_create(&CallLabel { call });
        }

        let mut registry = Registry::with_prefix("deployra_builder");
        registry.register(
            "builds",
            "Jobs that reached an end on this builder, by outcome",
            builds.clone(),
        );
        registry.register(
            "build_failures",
            "FAILED jobs, by the kind of failure",
            failures.clone(),
        );
        registry.register_with_unit(
            "build_duration",
            "How long jobs that ran the pipeline took, from BUILDING to the final report and cleanup",
            Unit::Seconds,
            build_duration.clone(),
        );
        registry.register_with_unit(
            "step_duration",
            "How long each pipeline step took, whatever its result",
            Unit::Seconds,
            step_duration.clone(),
        );
        registry.register("running_builds", "Builds running now", running.clone());
        registry.register(
            "queue_length",
            "Jobs waiting in the Redis queue, as of the last scrape that reached Redis",
            queue_length.clone(),
        );
        registry.register(
            "dashboard_report_failures",
            "Dashboard calls that were rejected or given up after their retries",
            report_failures.clone(),
        );
        registry.register_with_unit(
            "last_success_timestamp",
            "When this builder last reported BUILDED (Unix time); 0 until then",
            Unit::Seconds,
            last_success.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            builds,
            failures,
            build_duration,
            step_duration,
            running,
            queue_length,
            report_failures,
            last_success,
        }
    }

    /// A job reached its end; a failure is counted by its
    /// [`JobError::kind`](crate::error::JobError::kind) too.
    pub fn job_ended(&self, outcome: &Outcome) {
        let kind = match outcome {
            Outcome::Failed(e) => Some(e.kind()),
            _ => None,
        };
        self.count(outcome.label(), kind);
        if let Outcome::Builded { .. } = outcome {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            self.last_success.set(now.as_secs_f64());
        }
    }

    /// A job was reported FAILED without an [`Outcome`]: before its pipeline
    /// started, or because the pipeline panicked. `kind` is
    /// [`JobError::kind`](crate::error::JobError::kind) where there is an
    /// error (an invalid job), else `interrupted_too_often` or `panic`.
    pub fn job_failed(&self, kind: &'static str) {
        self.count("failed", Some(kind));
    }

    fn count(&self, outcome: &'static str, failure_kind: Option<&'static str>) {
        self.builds.get_or_create(&OutcomeLabel { outcome }).inc();
        if let Some(kind) = failure_kind {
            self.failures.get_or_create(&KindLabel { kind }).inc();
        }
    }

    pub fn build_ran(&self, elapsed: Duration) {
        self.build_duration.observe(elapsed.as_secs_f64());
    }

    pub fn step_ran(&self, step: &'static str, elapsed: Duration) {
        self.step_duration
            .get_or_create(&StepLabel { step })
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_running(&self, builds: usize) {
        self.running.set(i64::try_from(builds).unwrap_or(i64::MAX));
    }

    pub fn set_queue_length(&self, jobs: u64) {
        self.queue_length.set(i64::try_from(jobs).unwrap_or(i64::MAX));
    }

    /// A dashboard call failed for good; `call` is `status` or `logs`.
    pub fn report_failed(&self, call: &'static str) {
        self.report_failures.get_or_create(&CallLabel { call }).inc();
    }

    /// The OpenMetrics text exposition, which Prometheus scrapes natively.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_from_the_start_under_the_documented_names() {
        let text = Metrics::new().encode();
        for line in [
            "deployra_builder_builds_total{outcome=\"builded\"} 0",
            "deployra_builder_builds_total{outcome=\"interrupted\"} 0",
            "deployra_builder_step_duration_seconds_count{step=\"push\"} 0",
            "deployra_builder_build_duration_seconds_count 0",
            "deployra_builder_running_builds 0",
            "deployra_builder_queue_length 0",
            "deployra_builder_dashboard_report_failures_total{call=\"status\"} 0",
            "deployra_builder_last_success_timestamp_seconds 0.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_failed_job_is_counted_with_its_kind_and_a_success_sets_the_time() {
        let metrics = Metrics::new();
        metrics.job_failed("build");
        metrics.job_ended(&Outcome::Builded {
            image_uri: "r@sha256:ab".to_owned(),
        });
        metrics.step_ran("clone", Duration::from_millis(300));
        let text = metrics.encode();
        assert!(
            text.contains("deployra_builder_builds_total{outcome=\"failed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("deployra_builder_build_failures_total{kind=\"build\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("deployra_builder_step_duration_seconds_bucket{le=\"0.5\",step=\"clone\"} 1\n"),
            "{text}"
        );
        assert!(
            !text.contains("deployra_builder_last_success_timestamp_seconds 0.0"),
            "{text}"
        );
    }
}
