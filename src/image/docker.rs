//! Builds and pushes through the Docker Engine API (bollard), forwarding
//! every line of output to the build's log as it arrives.
//!
//! Cancellation is by dropping: the futures here are raced against the
//! job's token by the pipeline, and dropping a build or push closes its HTTP
//! request, which makes the engine abort it.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::PathBuf;

use bollard::auth::DockerCredentials;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::{
    BuildImageOptions, CreateImageOptions, ListImagesOptions, PruneImagesOptions, PushImageOptions, RemoveImageOptions,
    TagImageOptions,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::cache::{CacheSource, KeptImage, CACHE_REPOSITORY};
use super::context::{self, ContextError, ContextStats};
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

#[derive(Clone)]
pub struct Engine {
    docker: Docker,
}

/// What to build: the checkout, the Dockerfile inside it, the tag to give,
/// and where layers may come from.
pub struct BuildRequest {
    pub root: PathBuf,
    pub dockerfile: String,
    pub tag: String,
    pub cache: CacheSource,
}

impl Engine {
    /// Connects as Docker's own client does (`DOCKER_HOST` or the local
    /// socket) and settles on the API version both sides speak.
    pub async fn connect() -> Result<Engine, DockerError> {
        let docker = Docker::connect_with_defaults()?.negotiate_version().await?;
        Ok(Engine { docker })
    }

    pub async fn ping(&self) -> Result<(), DockerError> {
        self.docker.ping().await.map(drop)
    }

    pub async fn build(&self, req: &BuildRequest, log: &LogSink) -> Result<ContextStats, ImageError> {
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
        let body = bollard::body_try_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));

        let (nocache, cachefrom) = match &req.cache {
            CacheSource::Disabled => (true, None),
            CacheSource::Local => (false, None),
            CacheSource::From(images) => (false, Some(images.clone())),
        };
        let options = BuildImageOptions {
            dockerfile: req.dockerfile.clone(),
            t: Some(req.tag.clone()),
            platform: PLATFORM.to_owned(),
            rm: true,
            forcerm: true,
            nocache,
            cachefrom,
            ..Default::default()
        };
        let mut output = self.docker.build_image(options, None, Some(body));
        let mut splitter = LineSplitter::default();
        let mut step: Option<String> = None;
        let mut failure: Option<ImageError> = None;
        while let Some(item) = output.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = info.stream {
                        for line in splitter.push(&text) {
                            if line.starts_with("Step ") {
                                step = Some(line.clone());
                            }
                            log.line(LogType::Stdout, &line);
                        }
                    }
                    if let Some(status) = info.status {
                        log.line(LogType::Stdout, &status);
                    }
                }
                Err(DockerError::DockerStreamError { error }) => {
                    failure = Some(ImageError::BuildFailed {
                        step: step.clone(),
                        message: error.trim().to_owned(),
                    });
                    break;
                }
                Err(e) => {
                    failure = Some(engine("build")(e));
                    break;
                }
            }
        }
        if let Some(rest) = splitter.finish() {
            log.line(LogType::Stdout, &rest);
        }
        drop(output);
        let context_result = writer_task.await.map_err(|e| ImageError::BuildFailed {
            step: None,
            message: format!("context writer panicked: {e}"),
        })?;
        match (failure, context_result) {
            // The engine ran steps, so it had the whole context: the step's
            // failure is the story.
            (Some(failure @ ImageError::BuildFailed { .. }), _) => {
                if let ImageError::BuildFailed { message, .. } = &failure {
                    log.line(LogType::Error, message);
                }
                Err(failure)
            }
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
                Ok(inspect) => inspect.metadata.and_then(|m| m.last_tag_time).unwrap_or_default(),
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

/// The engine streams output in arbitrary chunks; users read lines.
#[derive(Default)]
struct LineSplitter {
    partial: String,
}

impl LineSplitter {
    fn push(&mut self, chunk: &str) -> Vec<String> {
        self.partial.push_str(chunk);
        let mut lines = Vec::new();
        while let Some(pos) = self.partial.find('\n') {
            let mut line: String = self.partial.drain(..=pos).collect();
            line.pop();
            if line.ends_with('\r') {
                line.pop();
            }
            lines.push(line);
        }
        lines
    }

    fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.partial);
        (!rest.is_empty()).then_some(rest)
    }
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
    fn lines_are_reassembled_across_chunks() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push("Step 1/2 : FR"), Vec::<String>::new());
        assert_eq!(
            s.push("OM x\n ---> abc\r\npart"),
            vec!["Step 1/2 : FROM x", " ---> abc"]
        );
        assert_eq!(s.push("ial\n\n"), vec!["partial", ""]);
        assert_eq!(s.finish(), None);
        s.push("tail");
        assert_eq!(s.finish().as_deref(), Some("tail"));
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
