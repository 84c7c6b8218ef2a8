//! `deployra-builder run`: the daemon. Connects the clients and runs the
//! worker until SIGTERM or SIGINT.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deployra_builder::config::Config;
use deployra_builder::dashboard::{Dashboard, ShipperLimits};
use deployra_builder::image::docker::Engine;
use deployra_builder::metrics::Metrics;
use deployra_builder::ops::{self, Endpoints};
use deployra_builder::pipeline::Services;
use deployra_builder::queue::{self, Keys, Queue};
use deployra_builder::registry::ecr::Ecr;
use deployra_builder::systemd;
use deployra_builder::worker::{self, WorkerConfig};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Runs the daemon with a validated configuration, as `main` always has.
pub fn main(config: Config) -> ExitCode {
    init_tracing(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deployra-builder: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config));
    // A git fetch stuck on a server that never answers holds a blocking
    // thread that nothing can interrupt; its job is settled already, and
    // the process must not wait for it to exit.
    runtime.shutdown_timeout(BLOCKING_THREADS_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("deployra-builder: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long the exit waits for blocking threads still running.
const BLOCKING_THREADS_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    // Colour codes only for a person at a terminal, not in journald.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal());
    // systemd sets JOURNAL_STREAM when the output goes to journald, which
    // stamps every line itself: a second timestamp would only be noise.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    // Bound first, so that an address in use stops the daemon at once.
    let ops_listener = match config.metrics_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("METRICS_ADDR: cannot listen on {addr}"))?;
            tracing::info!(%addr, "serving /metrics and /healthz");
            Some(listener)
        }
        None => None,
    };
    let docker = super::connect_docker(config.docker_builder).await?;
    let metrics = Metrics::new();
    let endpoints = Endpoints::new(metrics.clone(), docker.clone());
    // Served while Redis is awaited (/healthz then says so) and through the
    // drain after SIGTERM (the metrics show the builds finishing); stopped
    // with the worker.
    let worker_stopped = CancellationToken::new();
    let ops_server =
        ops_listener.map(|listener| tokio::spawn(ops::serve(listener, endpoints.clone(), worker_stopped.clone())));
    let result = work(&config, docker, metrics, &endpoints, shutdown).await;
    worker_stopped.cancel();
    if let Some(server) = ops_server {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "the metrics server failed");
        }
    }
    result
}

/// Connects to the dashboard and Redis, then runs the worker until it has
/// drained.
async fn work(
    config: &Config,
    docker: Engine,
    metrics: Metrics,
    endpoints: &Endpoints,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dashboard = Dashboard::new(config.api_url.clone(), config.api_key.clone())
        .context("cannot set up the HTTP client")?
        .with_metrics(metrics.clone());
    let work_dir = fresh_work_dir(config)?;
    let redis = queue::client(&config.redis).context("REDIS_HOST/REDIS_PORT")?;
    let Some(queue) = connect_queue(&redis, config, &shutdown).await else {
        return Ok(());
    };
    endpoints.redis_connected(queue.clone());

    let services = Services {
        docker,
        ecr: Ecr::from_env().await,
        dashboard: dashboard.clone(),
        work_dir,
        build_timeout: config.build_timeout,
        log_limits: ShipperLimits {
            max_build_bytes: config.log_max_bytes,
            ..ShipperLimits::default()
        },
        pack_bin: config.pack_bin.clone(),
        paketo_builder: config.paketo_builder.clone(),
        cache: config.cache,
        disk: Arc::default(),
        metrics,
    };
    tracing::info!(queue = %config.queue_name, worker_id = %config.worker_id, "connected to Redis and Docker");
    let worker = WorkerConfig {
        concurrency: config.concurrency,
        shutdown_grace: config.shutdown_grace,
        cancel_channel: config.cancel_channel.clone(),
        watchdog: sd_notify::watchdog_enabled(),
    };
    worker::run(redis, queue, services, dashboard, worker, shutdown).await;
    Ok(())
}

/// This builder's own directory under WORK_DIR (builders sharing a host
/// and WORK_DIR must not delete each other's checkouts), emptied of what a
/// previous run left behind: its jobs are back in the queue by now.
fn fresh_work_dir(config: &Config) -> anyhow::Result<PathBuf> {
    let dir = config.work_dir.join(&config.worker_id);
    let context = || format!("WORK_DIR: cannot prepare {}", dir.display());
    if dir.exists() {
        let stale = std::fs::read_dir(&dir).with_context(context)?.count();
        if stale > 0 {
            tracing::info!(dir = %dir.display(), entries = stale, "removing work directories of a previous run");
        }
        std::fs::remove_dir_all(&dir).with_context(context)?;
    }
    std::fs::create_dir_all(&dir).with_context(context)?;
    Ok(dir)
}

/// Waits for Redis at start: a builder host may boot before Redis does.
async fn connect_queue(redis: &redis::Client, config: &Config, shutdown: &CancellationToken) -> Option<Queue> {
    let mut backoff = Duration::from_millis(250);
    let mut logged = false;
    loop {
        match Queue::connect(redis, Keys::new(&config.queue_name), &config.worker_id).await {
            Ok(queue) => return Some(queue),
            Err(e) => {
                if !logged {
                    tracing::error!(host = %config.redis.host, port = config.redis.port, error = %e, "cannot connect to Redis; retrying");
                    logged = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot listen for signals; stop the daemon with SIGKILL");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: no new jobs; finishing running builds, then exiting"),
        _ = int.recv() => tracing::info!("SIGINT: no new jobs; finishing running builds, then exiting"),
    }
    systemd::stopping();
    shutdown.cancel();
}
