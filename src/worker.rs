//! The loop: wait for a free build slot, take a job, run it in its own
//! task, settle it, repeat; and on shutdown, drain.
//!
//! A job's failure or panic never stops the loop, and a Redis outage is
//! waited out with backoff, logged once. Before a job is built the worker
//! makes sure it should be: not a payload that is no job (dead letter), not
//! a duplicate of one that is running or already done, not cancelled while
//! it waited, not a job that keeps killing its builders.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cancel;
use crate::control::{JobControl, Running, StopReason};
use crate::dashboard::{Dashboard, LogLine, LogType, Status, StatusReport};
use crate::error::JobError;
use crate::job;
use crate::pipeline::{self, Finished, Outcome, Services};
use crate::queue::{Claim, Queue, HEARTBEAT_TTL};
use crate::systemd;

/// A job whose builder died this many times is failed instead of retried.
pub const MAX_ATTEMPTS: u64 = 3;

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the worker needs besides the build services.
pub struct WorkerConfig {
    pub concurrency: usize,
    pub shutdown_grace: Duration,
    pub cancel_channel: String,
    /// systemd's watchdog interval (`WATCHDOG_USEC`), when it has one.
    pub watchdog: Option<Duration>,
}

#[derive(Clone)]
struct Shared {
    queue: Queue,
    services: Services,
    dashboard: Dashboard,
    running: Running,
    /// The deployments whose pipeline runs now, for the running_builds
    /// gauge and systemd's STATUS; unlike `running`, without the jobs that
    /// are only being checked.
    building: Arc<Mutex<BTreeSet<String>>>,
    /// How long a deployment's running lock lives: longer than any build.
    lock_ttl: Duration,
    shutdown: CancellationToken,
}

/// Runs until `shutdown` fires, then lets running builds finish for the
/// grace period, puts the ones still running back in the queue, and
/// returns.
pub async fn run(
    redis: redis::Client,
    queue: Queue,
    services: Services,
    dashboard: Dashboard,
    config: WorkerConfig,
    shutdown: CancellationToken,
) {
    let shared = Shared {
        lock_ttl: services.build_timeout + config.shutdown_grace + Duration::from_secs(600),
        queue,
        services,
        dashboard,
        running: Running::default(),
        building: Arc::default(),
        shutdown: shutdown.clone(),
    };
    let background = CancellationToken::new();
    let mut helpers = JoinSet::new();
    let (subscribed, cancel_ready) = oneshot::channel();
    helpers.spawn(cancel::listen(
        redis,
        config.cancel_channel.clone(),
        shared.queue.clone(),
        shared.running.clone(),
        subscribed,
        background.clone(),
    ));
    let (beat, last_beat) = watch::channel(Instant::now());
    helpers.spawn(heartbeat(shared.queue.clone(), beat, background.clone()));
    if let Some(interval) = config.watchdog {
        helpers.spawn(watchdog(interval, last_beat, background.clone(), systemd::watchdog));
    }

    let mut jobs = JoinSet::new();
    if start(&shared, cancel_ready).await {
        tracing::info!(
            queue = %shared.queue.keys().queue,
            concurrency = config.concurrency,
            "deployra-builder ready"
        );
        systemd::ready();
        take_loop(&shared, config.concurrency, &mut jobs).await;
    }
    drain(&shared, config.shutdown_grace, &mut jobs).await;

    background.cancel();
    while helpers.join_next().await.is_some() {}
    let mut queue = shared.queue.clone();
    if let Err(e) = queue.retire().await {
        tracing::debug!(error = %e, "could not remove the heartbeat");
    }
    tracing::info!("worker stopped");
}

/// Recovers the jobs of stopped builders (this one's own included) and
/// waits for the cancel subscription. False when shutdown came first.
async fn start(shared: &Shared, cancel_ready: oneshot::Receiver<()>) -> bool {
    let mut queue = shared.queue.clone();
    let mut outage = Outage::default();
    while let Err(e) = queue.recover(true).await.map(|n| log_recovered(n, "at start")) {
        if !outage.wait(&e, &shared.shutdown).await {
            return false;
        }
    }
    outage.over();
    tokio::select! {
        _ = shared.shutdown.cancelled() => false,
        _ = cancel_ready => true,
    }
}

async fn take_loop(shared: &Shared, concurrency: usize, jobs: &mut JoinSet<()>) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut queue = shared.queue.clone();
    let mut outage = Outage::default();
    loop {
        let slot = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => slot.expect("the slot semaphore is never closed"),
        };
        let taken = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            taken = queue.take() => taken,
        };
        match taken {
            Ok(Some(raw)) => {
                outage.over();
                let shared = shared.clone();
                jobs.spawn(async move {
                    handle(&shared, raw).await;
                    drop(slot);
                });
            }
            Ok(None) => outage.over(),
            Err(e) => {
                if !outage.wait(&e, &shared.shutdown).await {
                    return;
                }
            }
        }
        while let Some(done) = jobs.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "a job task failed outside the pipeline");
            }
        }
    }
}

async fn drain(shared: &Shared, grace: Duration, jobs: &mut JoinSet<()>) {
    if jobs.is_empty() {
        return;
    }
    tracing::info!(
        running = jobs.len(),
        grace_secs = grace.as_secs(),
        "waiting for running builds to finish"
    );
    let all_done = async { while jobs.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_done).await.is_ok() {
        return;
    }
    tracing::warn!(
        running = shared.running.len(),
        "grace period over; stopping builds and putting them back in the queue"
    );
    shared.running.stop_all(StopReason::Shutdown);
    while jobs.join_next().await.is_some() {}
}

fn log_recovered(moved: u64, when: &str) {
    if moved > 0 {
        tracing::warn!(
            jobs = moved,
            when,
            "put jobs of stopped builders back at the head of the queue"
        );
    }
}

/// Keeps this builder's heartbeat alive and, every few beats, recovers the
/// jobs of builders whose heartbeat expired. `beat` records each round,
/// whether Redis answered or not, for the [`watchdog`].
async fn heartbeat(mut queue: Queue, beat: watch::Sender<Instant>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(HEARTBEAT_TTL / 3);
    let mut beats: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = queue.heartbeat().await;
        beat.send_replace(Instant::now());
        if let Err(e) = result {
            tracing::debug!(error = %e, "heartbeat failed");
            continue;
        }
        beats += 1;
        if beats % 3 == 0 {
            match queue.recover(false).await {
                Ok(n) => log_recovered(n, "while running"),
                Err(e) => tracing::debug!(error = %e, "recovery of stopped builders' jobs failed"),
            }
        }
    }
}

/// Pings systemd's watchdog at half its interval while the heartbeat loop
/// goes round. When that loop has not gone round for [`HEARTBEAT_TTL`], the
/// other builders already take this one for dead and take over its jobs;
/// the pings stop so that systemd restarts it too. A Redis outage does not
/// stop the pings: the loop goes round through it, and a restart would only
/// interrupt the builds.
async fn watchdog(
    interval: Duration,
    last_beat: watch::Receiver<Instant>,
    stop: CancellationToken,
    mut ping: impl FnMut(),
) {
    let mut tick = tokio::time::interval(interval / 2);
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let silent_for = last_beat.borrow().elapsed();
        if silent_for < HEARTBEAT_TTL {
            stalled = false;
            ping();
        } else if !stalled {
            stalled = true;
            tracing::error!(
                silent_secs = silent_for.as_secs(),
                "the heartbeat loop is stuck; no more watchdog pings, systemd will restart the builder"
            );
        }
    }
}

/// Remembers whether Redis is failing, so an outage is logged once.
#[derive(Default)]
struct Outage {
    since_error: Option<Duration>,
}

impl Outage {
    /// Logs the first error of an outage, then sleeps with backoff. Returns
    /// false when shutdown interrupted the wait.
    async fn wait(&mut self, e: &redis::RedisError, shutdown: &CancellationToken) -> bool {
        let backoff = match self.since_error {
            None => {
                tracing::error!(error = %e, "Redis unavailable; retrying with backoff");
                Duration::from_millis(250)
            }
            Some(previous) => (previous * 2).min(MAX_BACKOFF),
        };
        self.since_error = Some(backoff);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(backoff) => true,
        }
    }

    fn over(&mut self) {
        if self.since_error.take().is_some() {
            tracing::info!("Redis reachable again");
        }
    }
}

/// Retries a Redis operation through an outage (a job's bookkeeping must
/// not be skipped), until it succeeds or, with `give_up_on_shutdown`, the
/// builder is stopping.
async fn redis_retry<T, F, Fut>(shared: &Shared, what: &str, give_up_on_shutdown: bool, mut op: F) -> Option<T>
where
    F: FnMut(Queue) -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    let mut backoff = Duration::from_millis(250);
    let mut logged = false;
    loop {
        match op(shared.queue.clone()).await {
            Ok(value) => return Some(value),
            Err(e) => {
                if !logged {
                    tracing::warn!(error = %e, operation = what, "Redis operation failed; retrying");
                    logged = true;
                }
                if give_up_on_shutdown && shared.shutdown.is_cancelled() {
                    return None;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn handle(shared: &Shared, raw: Vec<u8>) {
    let routed = match String::from_utf8(raw) {
        Ok(raw) => match job::deployment_id(&raw) {
            Ok(id) => Ok((raw, id)),
            Err(reason) => Err((raw.into_bytes(), reason.to_string())),
        },
        Err(e) => Err((e.into_bytes(), "not UTF-8 text, so not a JSON job".to_owned())),
    };
    let (raw, deployment_id) = match routed {
        Ok(routed) => routed,
        Err((raw, reason)) => {
            tracing::warn!(reason = %reason, list = %shared.queue.keys().dead, "unroutable payload moved to the dead-letter list");
            redis_retry(shared, "dead-letter", false, |mut q| {
                let (raw, reason) = (raw.clone(), reason.clone());
                async move { q.dead_letter(&raw, &reason).await }
            })
            .await;
            return;
        }
    };
    let span = tracing::info_span!("job", deployment_id = %deployment_id);
    handle_routable(shared, raw, deployment_id).instrument(span).await;
}

/// How a taken job leaves this builder.
enum Settle {
    /// Remove it from the processing list.
    Ack,
    /// Remove it, and remember that duplicates must not run again.
    AckDone,
    /// Put it back at the head of the queue.
    Requeue { counts_as_attempt: bool },
}

async fn handle_routable(shared: &Shared, raw: String, deployment_id: String) {
    let id = deployment_id.as_str();
    if redis_retry(shared, "check done", false, |mut q| async move { q.is_done(id).await }).await == Some(true) {
        tracing::info!("duplicate of a deployment already built or cancelled; dropped");
        settle(shared, &raw, id, Settle::Ack, false).await;
        return;
    }
    let control = JobControl::new();
    if !shared.running.try_insert(id, control.clone()) {
        tracing::info!("duplicate of a deployment that is running here; dropped");
        settle(shared, &raw, id, Settle::Ack, false).await;
        return;
    }
    let ttl = shared.lock_ttl;
    if let Some(Claim::HeldBy(owner)) =
        redis_retry(shared, "claim", false, |mut q| async move { q.claim(id, ttl).await }).await
    {
        tracing::info!(
            owner,
            "duplicate of a deployment that is running on another builder; dropped"
        );
        shared.running.remove(id);
        settle(shared, &raw, id, Settle::Ack, false).await;
        return;
    }
    let settlement = decide(shared, &raw, id, control).await;
    shared.running.remove(id);
    settle(shared, &raw, id, settlement, true).await;
}

async fn decide(shared: &Shared, raw: &str, id: &str, control: JobControl) -> Settle {
    let cancelled = redis_retry(shared, "check cancel", false, |mut q| async move {
        q.is_cancelled(id).await
    })
    .await;
    if cancelled == Some(true) {
        tracing::info!("cancelled while queued; not built");
        let delivered = report(
            shared,
            id,
            StatusReport {
                status: Status::Cancelled,
                logs: Some(LogLine {
                    text: "Cancelled while queued; not built".to_owned(),
                    kind: LogType::Info,
                }),
                error: None,
                data: None,
            },
        )
        .await;
        shared.services.metrics.job_ended(&Outcome::Cancelled);
        return if delivered { Settle::AckDone } else { Settle::Ack };
    }
    let attempt = redis_retry(shared, "count attempt", false, |mut q| async move {
        q.count_attempt(id).await
    })
    .await
    .unwrap_or(1);
    if attempt > MAX_ATTEMPTS {
        tracing::error!(attempts = attempt - 1, "job interrupted too often; failing it");
        let error = format!(
            "interrupted {} times: the builder stopped during this build each time (crash, out of memory or kill); not retried",
            attempt - 1
        );
        report(shared, id, failed(error)).await;
        shared.services.metrics.job_failed("interrupted_too_often");
        return Settle::Ack;
    }
    let spec = match job::parse(raw).and_then(job::Job::validate) {
        Ok(spec) => spec,
        Err(invalid) => {
            tracing::warn!(error = %invalid, "invalid job");
            let error = JobError::from(invalid);
            report(shared, id, failed(error.to_string())).await;
            shared.services.metrics.job_failed(error.kind());
            return Settle::Ack;
        }
    };
    let services = shared.services.clone();
    let started = Instant::now();
    let building = Building::enter(shared, id);
    let task = tokio::spawn(async move { pipeline::run(&services, spec, control).await });
    let finished = task.await;
    drop(building);
    shared.services.metrics.build_ran(started.elapsed());
    match finished {
        Ok(Finished { outcome, delivered }) => {
            shared.services.metrics.job_ended(&outcome);
            match outcome {
                Outcome::Interrupted => Settle::Requeue {
                    counts_as_attempt: false,
                },
                // The dashboard never heard the verdict: try the job again
                // later (the attempt counter bounds this).
                _ if !delivered => Settle::Requeue {
                    counts_as_attempt: true,
                },
                Outcome::Builded { .. } | Outcome::Cancelled => Settle::AckDone,
                Outcome::Failed(_) => Settle::Ack,
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "job panicked");
            shared.services.metrics.job_failed("panic");
            report(
                shared,
                id,
                failed("internal error in the builder; the operator has the details".to_owned()),
            )
            .await;
            Settle::Ack
        }
    }
}

/// A deployment whose pipeline runs, from [`Building::enter`] until the
/// value is dropped; the running_builds gauge and systemd's STATUS follow.
struct Building<'a> {
    shared: &'a Shared,
    id: &'a str,
}

impl<'a> Building<'a> {
    fn enter(shared: &'a Shared, id: &'a str) -> Building<'a> {
        let mut building = shared.building.lock().expect("building-set lock poisoned");
        building.insert(id.to_owned());
        publish_building(shared, &building);
        Building { shared, id }
    }
}

impl Drop for Building<'_> {
    fn drop(&mut self) {
        let mut building = self.shared.building.lock().expect("building-set lock poisoned");
        building.remove(self.id);
        publish_building(self.shared, &building);
    }
}

/// Called with the lock held, so that systemd hears the changes in order.
fn publish_building(shared: &Shared, building: &BTreeSet<String>) {
    shared.services.metrics.set_running(building.len());
    systemd::status(&building.iter().collect::<Vec<_>>(), shared.shutdown.is_cancelled());
}

fn failed(error: String) -> StatusReport {
    StatusReport {
        status: Status::Failed,
        logs: None,
        error: Some(error),
        data: None,
    }
}

async fn report(shared: &Shared, id: &str, report: StatusReport) -> bool {
    match shared.dashboard.status(id, &report).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, status = ?report.status, "could not report to the dashboard");
            false
        }
    }
}

async fn settle(shared: &Shared, raw: &str, id: &str, how: Settle, locked: bool) {
    match how {
        Settle::Ack => {}
        Settle::AckDone => {
            redis_retry(shared, "mark done", false, |mut q| async move { q.mark_done(id).await }).await;
        }
        Settle::Requeue { counts_as_attempt } => {
            if !counts_as_attempt {
                redis_retry(shared, "uncount attempt", false, |mut q| async move {
                    q.uncount_attempt(id).await
                })
                .await;
            }
        }
    }
    if locked {
        redis_retry(shared, "release", false, |mut q| async move { q.release(id).await }).await;
    }
    match how {
        Settle::Requeue { .. } => {
            redis_retry(shared, "requeue", false, |mut q| async move { q.requeue(raw).await }).await;
            tracing::info!("put back at the head of the queue");
        }
        Settle::Ack | Settle::AckDone => {
            redis_retry(shared, "ack", false, |mut q| async move { q.ack(raw).await }).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_is_pinged_only_while_the_heartbeat_loop_goes_round() {
        let (beat, last_beat) = watch::channel(Instant::now());
        let pings = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let counter = pings.clone();
        let task = tokio::spawn(watchdog(Duration::from_secs(2), last_beat, stop.clone(), move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));

        // One ping a second while the last beat is younger than
        // HEARTBEAT_TTL (30 s): at 0 s, 1 s, ..., 29 s. (The half seconds
        // keep the test's wake-ups apart from the watchdog's ticks.)
        tokio::time::sleep(HEARTBEAT_TTL + Duration::from_millis(10_500)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 30);

        beat.send_replace(Instant::now());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 32, "pings resume with the heartbeat");

        stop.cancel();
        task.await.unwrap();
    }
}
