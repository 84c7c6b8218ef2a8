//! One job, from checkout to BUILDED: the steps, their reporting, and the
//! cleanup afterwards. Owns the job's root span.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::control::{JobControl, StopReason};
use crate::dashboard::{
    Dashboard, ImageData, LogLine, LogShipper, LogSink, LogType, ShipperLimits, Status, StatusReport,
};
use crate::error::JobError;
use crate::git::{self, FetchRequest};
use crate::image::cache::{self, CacheConfig, CacheSource};
use crate::image::docker::{BuildRequest, Engine, ImageError};
use crate::image::pack::{self, PackError, PackRequest};
use crate::job::{short, BuildSpec};
use crate::metrics::Metrics;
use crate::redact::Redactor;
use crate::registry::ecr::{self, Ecr, PushCredentials};
use crate::task::AbortOnDrop;
use crate::workspace;

/// What every job needs; cheap to clone.
#[derive(Clone)]
pub struct Services {
    pub docker: Engine,
    pub ecr: Ecr,
    pub dashboard: Dashboard,
    pub work_dir: PathBuf,
    pub build_timeout: Duration,
    pub log_limits: ShipperLimits,
    pub pack_bin: String,
    pub paketo_builder: String,
    pub cache: CacheConfig,
    /// Builds hold it shared while the Engine makes their image; pruning
    /// holds it alone. The classic builder leaves each step's image
    /// untagged until the next step starts from it, so a prune during a
    /// build could remove the image that build is about to use. Fair: a
    /// waiting prune holds back builds that have not started, not running
    /// ones. It also keeps disk checks one at a time.
    pub disk: Arc<tokio::sync::RwLock<()>>,
    pub metrics: Metrics,
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    Builded {
        image_uri: String,
    },
    Failed(JobError),
    Cancelled,
    /// Stopped by the builder's shutdown; no final status was sent and the
    /// job belongs back in the queue.
    Interrupted,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Builded { .. } => "builded",
            Outcome::Failed(_) => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::Interrupted => "interrupted",
        }
    }
}

/// What the worker needs to settle the job.
#[derive(Debug)]
pub struct Finished {
    pub outcome: Outcome,
    /// Whether the dashboard accepted the final status.
    pub delivered: bool,
}

/// Runs a validated job until it ends. Never fails: every error becomes
/// FAILED (or CANCELLED) on the dashboard. `control` stops it: a cancel, the
/// build timeout (armed here), or the builder's shutdown.
pub async fn run(services: &Services, spec: BuildSpec, control: JobControl) -> Finished {
    let span = tracing::info_span!("job", deployment_id = %spec.deployment_id, service_id = %spec.service_id);
    STEP_METRICS
        .scope(services.metrics.clone(), run_in_span(services, spec, control))
        .instrument(span)
        .await
}

tokio::task_local! {
    /// Where [`step`] records its duration. It reaches the steps through the
    /// job's task rather than as an argument so that every step call in
    /// [`build`] stays free of plumbing; a step run outside [`run`] records
    /// nothing.
    static STEP_METRICS: Metrics;
}

async fn run_in_span(services: &Services, spec: BuildSpec, control: JobControl) -> Finished {
    let started = Instant::now();
    // Up to a megabyte of secrets, each in several forms: built off the
    // async threads, which the heartbeat and the other jobs need.
    let redactor = {
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || spec.redactor())
            .await
            .expect("building the secret masker panicked")
    };
    tracing::info!(source = %spec.describe(), "job started");
    let building = StatusReport {
        status: Status::Building,
        logs: Some(LogLine {
            text: format!("Starting build of {}", spec.describe()),
            kind: LogType::Info,
        }),
        error: None,
        data: None,
    };
    if let Err(e) = services.dashboard.status(&spec.deployment_id, &building).await {
        tracing::error!(error = %e, "could not report BUILDING; building anyway");
    }

    let shipper = LogShipper::start(
        services.dashboard.clone(),
        spec.deployment_id.clone(),
        redactor.clone(),
        services.log_limits,
    );
    let timer = tokio::spawn({
        let control = control.clone();
        let timeout = services.build_timeout;
        async move {
            tokio::time::sleep(timeout).await;
            control.stop(StopReason::TimedOut);
        }
    });

    let workdir = services.work_dir.join(dir_name(&spec.deployment_id));
    let mut local_tags = Vec::new();
    let result = build(
        services,
        &spec,
        &workdir,
        control.token(),
        &shipper.sink(),
        &mut local_tags,
    )
    .await;
    timer.abort();

    let outcome = match result {
        Ok(image_uri) => Outcome::Builded { image_uri },
        Err(e) if e.is_cancelled() => match control.reason() {
            Some(StopReason::TimedOut) => Outcome::Failed(JobError::TimedOut(services.build_timeout)),
            Some(StopReason::Shutdown) => Outcome::Interrupted,
            Some(StopReason::Cancelled) | None => Outcome::Cancelled,
        },
        Err(e) => Outcome::Failed(e),
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let delivered = match final_report(&outcome, &redactor, &shipper.sink()) {
        Some(report) => {
            shipper.finish().await;
            match services.dashboard.status(&spec.deployment_id, &report).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, status = ?report.status, "could not report the final status");
                    false
                }
            }
        }
        None => {
            shipper.sink().info("The builder is restarting; this build was stopped and put back in the queue, it will start again shortly");
            shipper.finish().await;
            false
        }
    };
    match &outcome {
        Outcome::Builded { image_uri } => tracing::info!(image = %image_uri, elapsed_ms, "job builded"),
        Outcome::Failed(e) => {
            tracing::warn!(kind = e.kind(), error = %redactor.redact(&e.to_string()), elapsed_ms, "job failed")
        }
        other => tracing::info!(outcome = other.label(), elapsed_ms, "job stopped"),
    }
    cleanup(services, &workdir, &local_tags).await;
    cache::enforce_budget(&services.docker, &services.cache, &services.disk).await;
    Finished { outcome, delivered }
}

/// The final status to send; `None` for a job that goes back to the queue.
fn final_report(outcome: &Outcome, redactor: &Redactor, log: &LogSink) -> Option<StatusReport> {
    let report = match outcome {
        Outcome::Builded { image_uri } => StatusReport {
            status: Status::Builded,
            logs: Some(LogLine {
                text: format!("Image pushed: {image_uri}"),
                kind: LogType::Info,
            }),
            error: None,
            data: Some(ImageData {
                container_image_uri: image_uri.clone(),
                container_registry_type: "ecr",
            }),
        },
        Outcome::Failed(e) => {
            let error = one_line(&redactor.redact(&e.to_string()));
            log.line(LogType::Error, &format!("Build failed: {error}"));
            StatusReport {
                status: Status::Failed,
                logs: None,
                error: Some(error),
                data: None,
            }
        }
        Outcome::Cancelled => StatusReport {
            status: Status::Cancelled,
            logs: Some(LogLine {
                text: "Build cancelled".to_owned(),
                kind: LogType::Info,
            }),
            error: None,
            data: None,
        },
        Outcome::Interrupted => return None,
    };
    Some(report)
}

/// The dashboard shows `error` on one line; engine messages can span many.
fn one_line(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if joined.len() <= 500 {
        return joined;
    }
    let mut cut = 500;
    while !joined.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &joined[..cut])
}

/// A deployment id may hold any printable character; the directory name is
/// made of the safe ones plus a hash, so two ids never share a directory.
fn dir_name(deployment_id: &str) -> String {
    let safe: String = deployment_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let hash = deployment_id.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    format!("{safe}-{hash:016x}")
}

async fn race<T>(
    token: &CancellationToken,
    work: impl std::future::Future<Output = Result<T, JobError>>,
) -> Result<T, JobError> {
    tokio::select! {
        biased;
        _ = token.cancelled() => Err(JobError::Cancelled),
        result = work => result,
    }
}

async fn step<T>(
    name: &'static str,
    work: impl std::future::Future<Output = Result<T, JobError>>,
) -> Result<T, JobError> {
    let started = Instant::now();
    tracing::info!(step = name, "step started");
    let result = work.instrument(tracing::info_span!("step", name)).await;
    let elapsed = started.elapsed();
    let _ = STEP_METRICS.try_with(|metrics| metrics.step_ran(name, elapsed));
    let elapsed_ms = elapsed.as_millis() as u64;
    match &result {
        Ok(_) => tracing::info!(step = name, elapsed_ms, "step finished"),
        Err(e) => tracing::info!(step = name, elapsed_ms, kind = e.kind(), "step ended with an error"),
    }
    result
}

async fn build(
    services: &Services,
    spec: &BuildSpec,
    workdir: &Path,
    token: &CancellationToken,
    log: &LogSink,
    local_tags: &mut Vec<String>,
) -> Result<String, JobError> {
    // The registry's answers do not depend on the checkout: ask while
    // fetching.
    let repository = ecr::repository_name(&spec.service_id);
    let clone = step("clone", async {
        prepare_dir(workdir).await?;
        log.info(&format!("Fetching {} ({})", spec.source.url, spec.branch));
        let source = spec.source.clone();
        let branch = spec.branch.clone();
        let commit = spec.commit.clone();
        let dest = workdir.to_owned();
        let cancel = token.clone();
        // The fetch stops itself at its next progress callback once the
        // token is cancelled; a server that accepts and then says nothing
        // calls back never, so the job does not wait for it: cancel,
        // timeout and shutdown end the step at once, and the thread is
        // left to its socket.
        let fetch = tokio::task::spawn_blocking(move || {
            let req = FetchRequest {
                source: &source,
                branch: &branch,
                commit: commit.as_deref(),
            };
            git::checkout(&req, &dest, &cancel)
        });
        let sha = race(token, async {
            Ok(fetch
                .await
                .map_err(|e| JobError::Internal(format!("git task: {e}")))??)
        })
        .await?;
        log.info(&format!("Checked out commit {sha}"));
        Ok(sha)
    });
    let registry = step(
        "registry",
        race(token, async {
            let uri = services.ecr.ensure_repository(&repository).await?;
            let credentials = services.ecr.push_credentials(&uri).await?;
            Ok((uri, credentials))
        }),
    );
    // The service's last image, for cache, is pulled while the clone runs:
    // on a fresh host that pull is the longest wait of a rebuild.
    let registry = async {
        let (uri, credentials) = registry.await?;
        let pull = CachePull::start(services, spec, &uri, &credentials);
        Ok::<_, JobError>((uri, credentials, pull))
    };
    let (commit, registry) = tokio::join!(clone, registry);
    // Whatever happens next, a pulled image is removed after the build.
    if let Ok((_, _, CachePull::Pulling { image, .. })) = &registry {
        local_tags.push(image.clone());
    }
    let commit = commit?;
    let (repo_uri, credentials, pull) = registry?;

    let has_dockerfile = step("prepare", async {
        workspace::write_env(workdir, &spec.env)?;
        workspace::extend_dockerignore(workdir)?;
        Ok(workspace::dockerfile_exists(workdir, &spec.dockerfile)?)
    })
    .await?;

    let commit_tag = format!("{repo_uri}:{commit}");
    local_tags.push(commit_tag.clone());
    let no_pruning = services.disk.read().await;
    if has_dockerfile {
        let cache = race(token, async { Ok(pull.finish(log).await) }).await?;
        step(
            "build",
            race(token, async {
                log.info(&format!("Building {} with {}", short(&commit), spec.dockerfile));
                let req = BuildRequest {
                    root: workdir.to_owned(),
                    dockerfile: spec.dockerfile.clone(),
                    tag: commit_tag.clone(),
                    cache,
                    secrets: Arc::new(spec.env.iter().cloned().collect()),
                };
                services.docker.build(&req, log).await.map_err(JobError::Build)?;
                Ok(())
            }),
        )
        .await?;
    } else {
        // Buildpacks take no cache image: the pull stops now, before this
        // build's image is tagged `latest` to be pushed.
        drop(pull);
        step("build", async {
            log.info(&format!(
                "No Dockerfile at {}; building {} with Cloud Native Buildpacks",
                spec.dockerfile,
                short(&commit)
            ));
            let req = PackRequest {
                pack_bin: services.pack_bin.clone(),
                builder: services.paketo_builder.clone(),
                root: workdir.to_owned(),
                image: commit_tag.clone(),
                port: spec.container_port,
                env: spec.env.clone(),
            };
            // pack is stopped through the token, not by dropping it: that
            // gives it the SIGTERM it needs to remove its build container.
            pack::build(&req, log, token).await.map_err(|e| match e {
                PackError::Cancelled => JobError::Cancelled,
                e => JobError::Pack(e),
            })
        })
        .await?;
    }
    // The image is tagged now; the push needs no protection from a prune.
    drop(no_pruning);

    let digest = step(
        "push",
        race(token, async {
            services
                .docker
                .tag(&commit_tag, &repo_uri, "latest")
                .await
                .map_err(JobError::Push)?;
            let latest = format!("{repo_uri}:latest");
            if !local_tags.contains(&latest) {
                local_tags.push(latest);
            }
            log.info(&format!("Pushing {repo_uri}"));
            let digest = services
                .docker
                .push(&repo_uri, &commit, &credentials, log)
                .await
                .map_err(JobError::Push)?;
            services
                .docker
                .push(&repo_uri, "latest", &credentials, log)
                .await
                .map_err(JobError::Push)?;
            Ok(digest)
        }),
    )
    .await?;
    if has_dockerfile && services.cache.enabled {
        if services.docker.uses_buildkit() {
            // BuildKit's own cache holds the layers, where no build's FROM
            // can name them: no image of the service stays on the Engine.
            services.docker.built(&spec.service_id);
        } else {
            let (repo, tag) = cache::cache_tag(&spec.service_id)
                .rsplit_once(':')
                .map(|(r, t)| (r.to_owned(), t.to_owned()))
                .expect("a cache tag has a tag");
            if let Err(e) = services.docker.tag(&commit_tag, &repo, &tag).await {
                tracing::warn!(error = %e, "could not keep the image as the next build's cache");
            }
        }
    }
    Ok(format!("{repo_uri}@{digest}"))
}

/// Where this build's layers come from, decided while the clone runs. Never
/// fails the build: the cache only makes it faster.
enum CachePull {
    Decided(CacheSource),
    /// The service's last image is being pulled; dropping this stops it.
    Pulling {
        image: String,
        /// Whether it pulled (false: the classic builder's kept image is
        /// there), or why not, or that the registry was too slow.
        task: AbortOnDrop<Result<Result<bool, ImageError>, tokio::time::error::Elapsed>>,
    },
}

impl CachePull {
    fn start(services: &Services, spec: &BuildSpec, repo_uri: &str, credentials: &PushCredentials) -> CachePull {
        if !services.cache.enabled {
            return CachePull::Decided(CacheSource::Disabled);
        }
        if services.docker.uses_buildkit() && services.docker.holds_layers_of(&spec.service_id) {
            return CachePull::Decided(CacheSource::Local);
        }
        let docker = services.docker.clone();
        let (repo, credentials) = (repo_uri.to_owned(), credentials.clone());
        let cache_tag = cache::cache_tag(&spec.service_id);
        let task = AbortOnDrop::spawn(async move {
            tokio::time::timeout(cache::PULL_TIMEOUT, async {
                // The classic builder finds its kept image by itself.
                if !docker.uses_buildkit() && docker.image_exists(&cache_tag).await.unwrap_or(true) {
                    return Ok(false);
                }
                docker.pull(&repo, "latest", &credentials).await.map(|()| true)
            })
            .await
        });
        CachePull::Pulling {
            image: format!("{repo_uri}:latest"),
            task,
        }
    }

    async fn finish(self, log: &LogSink) -> CacheSource {
        let (image, mut task) = match self {
            CachePull::Decided(CacheSource::Disabled) => {
                log.info("Build cache off (BUILD_CACHE): every layer is built anew");
                return CacheSource::Disabled;
            }
            CachePull::Decided(source) => {
                log.info("Reusing this builder's layers from the service's previous build");
                return source;
            }
            CachePull::Pulling { image, task } => (image, task),
        };
        match (&mut task.0).await {
            Ok(Ok(Ok(false))) => {
                log.info("Reusing this builder's layers from the service's previous build");
                CacheSource::Local
            }
            Ok(Ok(Ok(true))) => {
                log.info("Pulled the service's last image from the registry to reuse its layers");
                CacheSource::From(vec![image])
            }
            Ok(Ok(Err(e))) => {
                tracing::debug!(error = %e, "no previous image to pull");
                log.info("No previous image of this service in the registry; building without cache");
                CacheSource::Local
            }
            Ok(Err(_)) => {
                log.info("The registry took too long to give the previous image; building without it");
                CacheSource::Local
            }
            Err(e) => {
                tracing::warn!(error = %e, "the cache pull task failed");
                CacheSource::Local
            }
        }
    }
}

async fn prepare_dir(dir: &Path) -> Result<(), JobError> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)
    })
    .await
    .map_err(|e| JobError::Internal(format!("workdir task: {e}")))?
    .map_err(|e| JobError::Internal(format!("cannot create the work directory: {e}")))
}

async fn cleanup(services: &Services, workdir: &Path, local_tags: &[String]) {
    for tag in local_tags {
        if let Err(e) = services.docker.remove_tag(tag).await {
            tracing::warn!(image = %tag, error = %e, "could not remove a local image tag");
        }
    }
    let dir = workdir.to_owned();
    let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    })
    .await;
    if let Ok(Err(e)) = removed {
        tracing::warn!(dir = %workdir.display(), error = %e, "could not remove the work directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_names_are_safe_and_distinct() {
        let a = dir_name("../../etc");
        assert!(!a.contains('/') && !a.contains(".."), "{a}");
        assert_ne!(dir_name("a/b"), dir_name("a_b"));
    }

    #[test]
    fn errors_are_folded_to_one_line() {
        assert_eq!(one_line("a\n  b\tc\n"), "a b c");
        assert!(one_line(&"é".repeat(400)).ends_with('…'));
    }
}
