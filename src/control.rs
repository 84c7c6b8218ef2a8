//! Stopping builds: each running job has a [`JobControl`], a cancellation
//! token plus the reason it was stopped, and [`Running`] finds them by
//! deployment id for the cancel listener and the shutdown drain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio_util::sync::CancellationToken;

/// Why a build was stopped before it finished; the first reason wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The dashboard cancelled the deployment: report CANCELLED.
    Cancelled,
    /// It ran past BUILD_TIMEOUT_SECS: report FAILED.
    TimedOut,
    /// The builder is shutting down: put the job back in the queue.
    Shutdown,
}

#[derive(Clone, Default)]
pub struct JobControl {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
}

impl JobControl {
    pub fn new() -> JobControl {
        JobControl::default()
    }

    pub fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.get().copied()
    }
}

/// The jobs running in this builder, by deployment id.
#[derive(Clone, Default)]
pub struct Running {
    jobs: Arc<Mutex<HashMap<String, JobControl>>>,
}

impl Running {
    /// Registers a job; false when the deployment already runs here.
    pub fn try_insert(&self, deployment_id: &str, control: JobControl) -> bool {
        match self.lock().entry(deployment_id.to_owned()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(control);
                true
            }
        }
    }

    pub fn remove(&self, deployment_id: &str) {
        self.lock().remove(deployment_id);
    }

    /// Stops the deployment if it runs here; tells whether it did.
    pub fn stop(&self, deployment_id: &str, reason: StopReason) -> bool {
        match self.lock().get(deployment_id) {
            Some(control) => {
                control.stop(reason);
                true
            }
            None => false,
        }
    }

    pub fn stop_all(&self, reason: StopReason) {
        for control in self.lock().values() {
            control.stop(reason);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobControl>> {
        self.jobs.lock().expect("running-jobs lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_only_the_named_job_stops() {
        let running = Running::default();
        let a = JobControl::new();
        let b = JobControl::new();
        assert!(running.try_insert("a", a.clone()));
        assert!(running.try_insert("b", b.clone()));
        assert!(!running.try_insert("a", JobControl::new()));
        assert!(running.stop("a", StopReason::Cancelled));
        assert!(!running.stop("missing", StopReason::Cancelled));
        running.stop_all(StopReason::Shutdown);
        assert_eq!(a.reason(), Some(StopReason::Cancelled));
        assert_eq!(b.reason(), Some(StopReason::Shutdown));
        assert!(a.token().is_cancelled() && b.token().is_cancelled());
    }
}
