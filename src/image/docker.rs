//! Builds and pushes through the Docker Engine API (bollard), forwarding
//! every line of output to the build's log as it arrives.
//!
//! Dockerfiles are built by BuildKit (the Engine's own, through a session
//! it serves on `/session`) unless the operator chose the classic builder
//! or the Engine refuses BuildKit; [`super::buildkit`] reads its progress.
//!
//! Cancellation is by dropping: the futures here are raced against the
//! job's token by the pipeline, and dropping a build or push closes its HTTP
//! request, which makes the engine abort it.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bollard::auth::DockerCredentials;
use bollard::errors::Error as DockerError;
use bollard::grpc::BuildRef;
use bollard::models::{BuildInfo, BuildInfoAux};
use bollard::query_parameters::{
    BuildImageOptions, BuilderVersion, CreateImageOptions, ListImagesOptions, PruneBuildOptions, PruneImagesOptions,
    PushImageOptions, RemoveImageOptions, TagImageOptions,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;

use super::buildkit::{Progress, CLIPPED_NOTICE};
use super::cache::{CacheSource, KeptImage, CACHE_REPOSITORY};
use super::context::{self, ContextError, ContextStats};
use super::engine_conn::{EngineAddress, EngineApi};
use super::lines::LineBuffer;
use super::session::{self, BuildSecrets, Registries};
use crate::dashboard::{LogSink, LogType};
use crate::registry::ecr::PushCredentials;

pub const PLATFORM: &str = "linux/amd64";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {message}", step.as_deref().unwrap_or("before the first step"))]
    BuildFailed { step: Option<String>, message: String },
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("pushing {image} failed: {message}")]
    PushFailed { image: String, message: String },
    /// The Engine would not build with BuildKit: an engine without it, or
    /// one that refuses sessions. The caller falls back to the classic
    /// builder.
    #[error("the Docker Engine refused a BuildKit build: {message}")]
    BuildKitRefused { message: String },
    #[error("Docker Engine {operation} failed: {source}")]
    Engine {
        operation: &'static str,
        #[source]
        source: DockerError,
    },
    #[error("pushed {image} but the registry reported no digest")]
    NoDigest { image: String },
}

fn engine(operation: &'static str) -> impl FnOnce(DockerError) -> ImageError {
    move |source| ImageError::Engine { operation, source }
}

/// Which of the Engine's builders makes images from Dockerfiles
/// (`DOCKER_BUILDER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builder {
    /// BuildKit, through a session the Engine serves itself: what
    /// `docker build` uses on every Engine since 23.0.
    BuildKit,
    /// The Engine's original builder, deprecated by Docker: no `RUN
    /// --mount`, `COPY --chmod` or skipped stages.
    Classic,
}

/// The builder in use, shared by every clone of an [`Engine`]: a fallback
/// to the classic builder holds for the rest of the process.
struct BuilderChoice {
    buildkit: AtomicBool,
}

impl BuilderChoice {
    fn uses_buildkit(&self) -> bool {
        self.buildkit.load(Ordering::Relaxed)
    }

    /// Switches to the classic builder; true for the first caller only, so
    /// that the switch is logged once.
    fn fall_back(&self) -> bool {
        self.buildkit.swap(false, Ordering::Relaxed)
    }
}

/// Whether an Engine's answer to a BuildKit build means it will not do
/// BuildKit at all, as opposed to a build that failed.
fn refuses_buildkit(e: &DockerError) -> bool {
    match e {
        DockerError::DockerResponseServerError { status_code, message } => {
            let message = message.to_ascii_lowercase();
            matches!(status_code, 400 | 404 | 501) && (message.contains("buildkit") || message.contains("session"))
        }
        _ => false,
    }
}

#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    builder: Arc<BuilderChoice>,
    /// The same Engine, for the calls of a BuildKit session of our own.
    api: EngineApi,
    /// The registry logins a build's session may hand out.
    registries: Arc<Registries>,
    /// Services whose layers BuildKit's cache holds: built here since the
    /// builder started, and not pruned since.
    warm: Arc<Mutex<HashSet<String>>>,
}

/// What to build: the checkout, the Dockerfile inside it, the tag to give,
/// where layers may come from, and the secrets BuildKit may mount.
pub struct BuildRequest {
    pub root: PathBuf,
    pub dockerfile: String,
    pub tag: String,
    pub cache: CacheSource,
    pub secrets: BuildSecrets,
}

/// A build's output, item by item, whichever builder makes it.
type BuildOutput<'a> = Pin<Box<dyn Stream<Item = Result<BuildInfo, DockerError>> + Send + 'a>>;

impl Engine {
    /// Connects as Docker's own client does (`DOCKER_HOST` or the local
    /// socket) and settles on the API version both sides speak.
    pub async fn connect(builder: Builder, registries: Registries) -> Result<Engine, DockerError> {
        let docker = Docker::connect_with_defaults()?.negotiate_version().await?;
        let address = EngineAddress::from_docker_host(std::env::var("DOCKER_HOST").ok().as_deref()).map_err(|e| {
            DockerError::IOError {
                err: io::Error::other(e),
            }
        })?;
        let version = docker.client_version();
        let api = EngineApi {
            address,
            version: format!("{}.{}", version.major_version, version.minor_version),
        };
        let builder = Arc::new(BuilderChoice {
            buildkit: AtomicBool::new(builder == Builder::BuildKit),
        });
        Ok(Engine {
            docker,
            builder,
            api,
            registries: Arc::new(registries),
            warm: Arc::default(),
        })
    }

    /// Whether Dockerfiles are built with BuildKit (rather than the classic
    /// builder, chosen or fallen back to).
    pub fn uses_buildkit(&self) -> bool {
        self.builder.uses_buildkit()
    }

    /// Whether this engine's BuildKit cache holds `service`'s layers, so
    /// that its build needs no image pulled for cache.
    pub fn holds_layers_of(&self, service: &str) -> bool {
        self.warm.lock().expect("warm services lock poisoned").contains(service)
    }

    /// `service` was built here: its layers are in BuildKit's cache.
    pub fn built(&self, service: &str) {
        self.warm
            .lock()
            .expect("warm services lock poisoned")
            .insert(service.to_owned());
    }

    pub async fn ping(&self) -> Result<(), DockerError> {
        self.docker.ping().await.map(drop)
    }

    /// Builds the image with the builder this engine was given; when that
    /// is BuildKit and the Engine refuses it, with the classic builder from
    /// then on.
    pub async fn build(&self, req: &BuildRequest, log: &LogSink) -> Result<ContextStats, ImageError> {
        if self.builder.uses_buildkit() {
            match self.build_with(Builder::BuildKit, req, log).await {
                Err(ImageError::BuildKitRefused { message }) => {
                    if self.builder.fall_back() {
                        tracing::warn!(
                            engine_said = %message,
                            "the Docker Engine refused a BuildKit session; building with the classic builder from now on"
                        );
                    }
                    log.info("This Docker Engine does not offer BuildKit; building with the classic builder");
                }
                other => return other,
            }
        }
        self.build_with(Builder::Classic, req, log).await
    }

    async fn build_with(
        &self,
        builder: Builder,
        req: &BuildRequest,
        log: &LogSink,
    ) -> Result<ContextStats, ImageError> {
        let (tx, mut rx) = mpsc::channel::<Result<Bytes, io::Error>>(8);
        let root = req.root.clone();
        let dockerfile = req.dockerfile.clone();
        let writer_task = tokio::task::spawn_blocking(move || {
            let mut writer = ChannelWriter::new(tx.clone());
            let result = context::write_context(&root, &dockerfile, &mut writer);
            match &result {
                Ok(_) => {
                    let _ = writer.flush();
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
                }
            }
            result
        });
        let context = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));

        let (nocache, cachefrom) = match &req.cache {
            CacheSource::Disabled => (true, None),
            CacheSource::Local => (false, None),
            CacheSource::From(images) => (false, Some(images.clone())),
        };
        let mut options = BuildImageOptions {
            dockerfile: req.dockerfile.clone(),
            t: Some(req.tag.clone()),
            platform: PLATFORM.to_owned(),
            rm: true,
            forcerm: true,
            nocache,
            cachefrom,
            ..Default::default()
        };
        // Held until the build's output ends: the Engine calls it meanwhile.
        let mut _session = None;
        let mut output: BuildOutput<'_> = match builder {
            Builder::Classic => self
                .docker
                .build_image(options, None, Some(bollard::body_try_stream(context)))
                .boxed(),
            Builder::BuildKit => {
                let id: String = BuildRef::random().into();
                options.version = BuilderVersion::BuilderBuildKit;
                options.session = Some(id.clone());
                if !nocache {
                    // The cache metadata goes into the pushed image, so that
                    // a host that has never built this service can reuse
                    // its layers (`cachefrom`).
                    options.buildargs = Some(HashMap::from([("BUILDKIT_INLINE_CACHE".to_owned(), "1".to_owned())]));
                }
                _session = Some(
                    session::start(&self.api, &id, req.secrets.clone(), self.registries.clone())
                        .await
                        .map_err(|e| match e {
                            DockerError::DockerResponseServerError {
                                status_code: 400 | 404 | 501,
                                ..
                            } => ImageError::BuildKitRefused { message: e.to_string() },
                            e => engine("BuildKit session")(e),
                        })?,
                );
                let query = serde_urlencoded::to_string(&options).map_err(|e| ImageError::BuildFailed {
                    step: None,
                    message: format!("build options: {e}"),
                })?;
                match self.api.build(&query, context).await {
                    Ok(output) => output.boxed(),
                    Err(e) if refuses_buildkit(&e) => {
                        return Err(ImageError::BuildKitRefused { message: e.to_string() })
                    }
                    Err(e) => return Err(engine("build")(e)),
                }
            }
        };
        let mut lines = LineBuffer::default();
        let mut progress = Progress::default();
        let mut spoke_buildkit = false;
        let mut step: Option<String> = None;
        let mut failure: Option<ImageError> = None;
        while let Some(item) = output.next().await {
            match item {
                Ok(info) => {
                    if let Some(BuildInfoAux::BuildKit(status)) = info.aux {
                        spoke_buildkit = true;
                        for (kind, line) in progress.update(status) {
                            log.line(kind, &line);
                        }
                    }
                    if let Some(text) = info.stream {
                        lines.push(text.as_bytes(), &mut |line| {
                            if line.starts_with("Step ") {
                                step = Some(line.clone());
                            }
                            log.line(LogType::Stdout, &line);
                        });
                    }
                    if let Some(status) = info.status {
                        log.line(LogType::Stdout, &status);
                    }
                }
                Err(DockerError::DockerStreamError { error }) => {
                    let message = error.trim().to_owned();
                    failure = Some(match progress.failure() {
                        Some(f) => ImageError::BuildFailed {
                            step: Some(f.step.clone()),
                            message: f.message.clone(),
                        },
                        None => {
                            log.line(LogType::Error, &message);
                            ImageError::BuildFailed {
                                step: step.clone(),
                                message,
                            }
                        }
                    });
                    break;
                }
                Err(e) if builder == Builder::BuildKit && !spoke_buildkit && refuses_buildkit(&e) => {
                    failure = Some(ImageError::BuildKitRefused { message: e.to_string() });
                    break;
                }
                Err(e) => {
                    failure = Some(engine("build")(e));
                    break;
                }
            }
        }
        if let Some(rest) = lines.finish() {
            log.line(LogType::Stdout, &rest);
        }
        for (kind, line) in progress.finish() {
            log.line(kind, &line);
        }
        if progress.clipped() {
            tracing::warn!("{CLIPPED_NOTICE}");
        }
        drop(output);
        let context_result = writer_task.await.map_err(|e| ImageError::BuildFailed {
            step: None,
            message: format!("context writer panicked: {e}"),
        })?;
        match (failure, context_result) {
            // The engine ran steps, so it had the whole context: the step's
            // failure is the story. So is a refusal, which the caller acts on.
            (Some(failure @ (ImageError::BuildFailed { .. } | ImageError::BuildKitRefused { .. })), _) => Err(failure),
            // A context that could not be written explains an aborted
            // request better than the engine's side of it.
            (_, Err(context)) => Err(context.into()),
            (Some(failure), Ok(_)) => Err(failure),
            (None, Ok(stats)) => Ok(stats),
        }
    }

    pub async fn tag(&self, image: &str, repo: &str, tag: &str) -> Result<(), ImageError> {
        let options = TagImageOptions {
            repo: Some(repo.to_owned()),
            tag: Some(tag.to_owned()),
        };
        self.docker.tag_image(image, Some(options)).await.map_err(engine("tag"))
    }

    /// Pushes `repo:tag`; returns the manifest digest the registry stored.
    pub async fn push(
        &self,
        repo: &str,
        tag: &str,
        creds: &PushCredentials,
        log: &LogSink,
    ) -> Result<String, ImageError> {
        let image = format!("{repo}:{tag}");
        let credentials = DockerCredentials {
            username: Some(creds.username.clone()),
            password: Some(creds.password.expose().to_owned()),
            serveraddress: Some(creds.server.clone()),
            ..Default::default()
        };
        let options = PushImageOptions {
            tag: Some(tag.to_owned()),
            platform: None,
        };
        let mut output = self.docker.push_image(repo, Some(options), Some(credentials));
        let mut digest = None;
        while let Some(item) = output.next().await {
            match item {
                Ok(info) => {
                    let Some(status) = info.status else { continue };
                    // Per-layer progress repeats many times a second; the
                    // state changes are what a user wants to read.
                    if info.progress_detail.is_some_and(|p| p.current.is_some()) {
                        continue;
                    }
                    if let Some(d) = parse_digest(&status) {
                        digest = Some(d.to_owned());
                    }
                    log.line(LogType::Stdout, &status);
                }
                Err(DockerError::DockerStreamError { error }) => {
                    return Err(ImageError::PushFailed { image, message: error });
                }
                Err(e) => return Err(engine("push")(e)),
            }
        }
        match digest {
            Some(d) => Ok(d),
            None => self.repo_digest(&image, repo).await,
        }
    }

    async fn repo_digest(&self, image: &str, repo: &str) -> Result<String, ImageError> {
        let inspect = self.docker.inspect_image(image).await.map_err(engine("inspect"))?;
        inspect
            .repo_digests
            .unwrap_or_default()
            .into_iter()
            .find_map(|d| d.strip_prefix(&format!("{repo}@")).map(str::to_owned))
            .ok_or_else(|| ImageError::NoDigest {
                image: image.to_owned(),
            })
    }

    pub async fn image_exists(&self, image: &str) -> Result<bool, ImageError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
            Err(e) => Err(engine("inspect")(e)),
        }
    }

    /// Pulls `repo:tag` with push credentials (ECR's token also reads).
    pub async fn pull(&self, repo: &str, tag: &str, creds: &PushCredentials) -> Result<(), ImageError> {
        let options = CreateImageOptions {
            from_image: Some(repo.to_owned()),
            tag: Some(tag.to_owned()),
            platform: PLATFORM.to_owned(),
            ..Default::default()
        };
        let credentials = DockerCredentials {
            username: Some(creds.username.clone()),
            password: Some(creds.password.expose().to_owned()),
            serveraddress: Some(creds.server.clone()),
            ..Default::default()
        };
        let mut output = self.docker.create_image(Some(options), None, Some(credentials));
        while let Some(item) = output.next().await {
            item.map_err(engine("pull"))?;
        }
        Ok(())
    }

    /// The kept cache images of every service on this engine.
    pub async fn kept_images(&self) -> Result<Vec<KeptImage>, ImageError> {
        let options = ListImagesOptions {
            filters: Some(HashMap::from([(
                "reference".to_owned(),
                vec![format!("{CACHE_REPOSITORY}/*")],
            )])),
            ..Default::default()
        };
        let images = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(engine("list images"))?;
        let mut kept = Vec::new();
        for tag in images.into_iter().flat_map(|i| i.repo_tags) {
            let last_used = match self.docker.inspect_image(&tag).await {
                Ok(inspect) => inspect
                    .metadata
                    .and_then(|m| m.last_tag_time)
                    .map_or(0, |t| t.unix_timestamp_nanos()),
                Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => continue,
                Err(e) => return Err(engine("inspect")(e)),
            };
            kept.push(KeptImage { tag, last_used });
        }
        Ok(kept)
    }

    /// Where the engine keeps its images, when it says.
    pub async fn data_root(&self) -> Result<Option<PathBuf>, ImageError> {
        let info = self.docker.info().await.map_err(engine("info"))?;
        Ok(info.docker_root_dir.map(PathBuf::from))
    }

    /// Removes images no tag refers to any more; returns the bytes freed.
    pub async fn prune_dangling(&self) -> Result<u64, ImageError> {
        let options = PruneImagesOptions {
            filters: Some(HashMap::from([("dangling".to_owned(), vec!["true".to_owned()])])),
        };
        let pruned = self
            .docker
            .prune_images(Some(options))
            .await
            .map_err(engine("prune images"))?;
        Ok(pruned.space_reclaimed.unwrap_or(0).max(0) as u64)
    }

    /// Removes BuildKit's cache records unused for at least `unused_for`
    /// (`"24h"`), or all of them; returns the bytes freed. BuildKit's cache
    /// is not images: pruning images leaves it whole.
    pub async fn prune_build_cache(&self, unused_for: Option<&str>) -> Result<u64, ImageError> {
        let options = PruneBuildOptions {
            all: Some(true),
            filters: unused_for.map(|age| HashMap::from([("until".to_owned(), vec![age.to_owned()])])),
            ..Default::default()
        };
        let pruned = self
            .docker
            .prune_build(Some(options))
            .await
            .map_err(engine("prune build cache"))?;
        // Which services' layers are left is not known: their next builds
        // take them from the registry again.
        self.warm.lock().expect("warm services lock poisoned").clear();
        Ok(pruned.space_reclaimed.unwrap_or(0).max(0) as u64)
    }

    /// Removes a local tag; the layers go when nothing else references them.
    pub async fn remove_tag(&self, image: &str) -> Result<(), DockerError> {
        let options = RemoveImageOptions {
            force: false,
            noprune: false,
            platforms: None,
        };
        match self.docker.remove_image(image, Some(options), None).await {
            Ok(_) => Ok(()),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// `latest: digest: sha256:… size: 527` → `sha256:…`
fn parse_digest(status: &str) -> Option<&str> {
    let rest = status.split_once("digest: ")?.1;
    let digest = rest.split_whitespace().next()?;
    digest.starts_with("sha256:").then_some(digest)
}

/// Adapts the blocking tar writer to the async request body: chunks of
/// `CHUNK` bytes go through a small channel, so the context is streamed,
/// never held whole in memory.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 * 1024;

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Result<Bytes, io::Error>>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the build request was closed"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send_buffer()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_engine_that_will_not_do_buildkit_is_a_refusal() {
        let answer = |status_code, message: &str| DockerError::DockerResponseServerError {
            status_code,
            message: message.to_owned(),
        };
        assert!(refuses_buildkit(&answer(400, "buildkit not supported by daemon")));
        assert!(refuses_buildkit(&answer(404, "page not found: /session")));
        assert!(!refuses_buildkit(&answer(500, "buildkit: worker crashed")));
        assert!(!refuses_buildkit(&answer(
            400,
            "dockerfile parse error line 2: unknown instruction: FOO"
        )));
        assert!(!refuses_buildkit(&DockerError::DockerStreamError {
            error: "executor failed running [/bin/sh -c exit 3]: exit code: 3".to_owned(),
        }));
    }

    #[test]
    fn the_classic_builder_is_chosen_once_and_for_all() {
        let choice = BuilderChoice {
            buildkit: AtomicBool::new(true),
        };
        assert!(choice.uses_buildkit());
        assert!(choice.fall_back(), "the first fallback is the one logged");
        assert!(!choice.fall_back());
        assert!(!choice.uses_buildkit());
    }

    #[test]
    fn digest_is_read_from_the_final_push_status() {
        assert_eq!(
            parse_digest("latest: digest: sha256:0123abcd size: 527"),
            Some("sha256:0123abcd")
        );
        assert_eq!(parse_digest("Pushed"), None);
    }
}
