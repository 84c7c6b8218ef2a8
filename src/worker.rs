//! The loop: take a job, turn it into a build or a dead letter, settle it,
//! take the next. A job's failure or panic never stops the loop, and a Redis
//! outage is waited out with backoff.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::dashboard::{Dashboard, Status, StatusReport};
use crate::job;
use crate::pipeline::{self, Services};
use crate::queue::Queue;

pub struct Worker {
    pub queue: Queue,
    pub services: Services,
    pub dashboard: Dashboard,
    pub worker_id: String,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Worker {
    /// Runs until `shutdown` fires. A job already running is finished first:
    /// it stays in this worker's processing list until settled, so even a
    /// hard kill only delays it until the next start.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        let mut outage = false;
        let mut recovered = false;
        while !shutdown.is_cancelled() {
            if !recovered {
                match self.queue.requeue_unsettled().await {
                    Ok(n) => {
                        recovered = true;
                        if n > 0 {
                            tracing::warn!(
                                jobs = n,
                                "put unsettled jobs of a previous run back at the head of the queue"
                            );
                        }
                    }
                    Err(e) => {
                        backoff = self.redis_trouble(&mut outage, backoff, &e, &shutdown).await;
                        continue;
                    }
                }
            }
            let taken = tokio::select! {
                _ = shutdown.cancelled() => break,
                taken = self.queue.take() => taken,
            };
            match taken {
                Ok(Some(raw)) => {
                    self.handle(&raw).await;
                    self.settle(&raw, &shutdown).await;
                }
                Ok(None) => {}
                Err(e) => {
                    backoff = self.redis_trouble(&mut outage, backoff, &e, &shutdown).await;
                    continue;
                }
            }
            if outage {
                tracing::info!("Redis reachable again");
                outage = false;
            }
            backoff = Duration::from_millis(250);
        }
        tracing::info!("worker stopped taking jobs");
    }

    /// Logs the first error of an outage only, then sleeps with backoff.
    async fn redis_trouble(
        &self,
        outage: &mut bool,
        backoff: Duration,
        e: &redis::RedisError,
        shutdown: &CancellationToken,
    ) -> Duration {
        if !*outage {
            tracing::error!(error = %e, "Redis unavailable; retrying with backoff");
            *outage = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(backoff) => {}
        }
        (backoff * 2).min(MAX_BACKOFF)
    }

    /// Removes the settled job from the processing list, retrying through a
    /// Redis outage (a job left there would be built again after a restart).
    async fn settle(&mut self, raw: &str, shutdown: &CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        for _ in 0..20 {
            match self.queue.ack(raw).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "could not remove a settled job from the processing list; retrying");
                    if shutdown.is_cancelled() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn handle(&mut self, raw: &str) {
        let deployment_id = match job::deployment_id(raw) {
            Ok(id) => id,
            Err(reason) => {
                tracing::warn!(reason = %reason, list = %self.queue.names().dead, "unroutable payload moved to the dead-letter list");
                if let Err(e) = self.queue.dead_letter(raw, &reason.to_string(), &self.worker_id).await {
                    tracing::error!(error = %e, "could not dead-letter an unroutable payload");
                }
                return;
            }
        };
        let spec = match job::parse(raw).and_then(job::Job::validate) {
            Ok(spec) => spec,
            Err(invalid) => {
                tracing::warn!(deployment_id, error = %invalid, "invalid job");
                let report = StatusReport {
                    status: Status::Failed,
                    logs: None,
                    error: Some(format!("invalid job: {invalid}")),
                    data: None,
                };
                if let Err(e) = self.dashboard.status(&deployment_id, &report).await {
                    tracing::error!(deployment_id, error = %e, "could not report FAILED for an invalid job");
                }
                return;
            }
        };
        let services = self.services.clone();
        let task = tokio::spawn(async move { pipeline::run(&services, spec, CancellationToken::new()).await });
        match task.await {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(deployment_id, error = %e, "job panicked");
                let report = StatusReport {
                    status: Status::Failed,
                    logs: None,
                    error: Some("internal error in the builder; the operator has the details".to_owned()),
                    data: None,
                };
                if let Err(e) = self.dashboard.status(&deployment_id, &report).await {
                    tracing::error!(deployment_id, error = %e, "could not report FAILED after a panic");
                }
            }
        }
    }
}
