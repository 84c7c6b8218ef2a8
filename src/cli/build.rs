//! `deployra-builder build`: one build on this machine through the daemon's
//! own clone, context and build code, with the output in the terminal
//! instead of the dashboard, so that what works here works in the daemon.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use deployra_builder::dashboard::{LogShipper, LogSink};
use deployra_builder::git::{self, FetchRequest};
use deployra_builder::image::cache::CacheSource;
use deployra_builder::image::docker::{BuildRequest, Engine};
use deployra_builder::job::{self, GitSource};
use deployra_builder::redact::{Redactor, Secret};
use reqwest::Url;
use tokio_util::sync::CancellationToken;

use super::BuildArgs;

pub async fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let dockerfile = job::normalize_relative_path(&args.dockerfile)
        .context("--dockerfile: must be a relative path inside the source (no '..')")?;
    let source = Source::parse(&args)?;
    let docker = super::connect_docker(args.builder).await?;

    // Ctrl-C stops the clone or the build and still removes the clone.
    let cancel = CancellationToken::new();
    let on_interrupt = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_interrupt.cancel();
        }
    });

    let shipper = LogShipper::to_terminal(source.redactor());
    let log = shipper.sink();
    let result = build(&source, &dockerfile, &args, &docker, &log, &cancel).await;
    shipper.finish().await;
    result.map(|()| ExitCode::SUCCESS)
}

async fn build(
    source: &Source,
    dockerfile: &str,
    args: &BuildArgs,
    docker: &Engine,
    log: &LogSink,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let clone;
    let root = match source {
        Source::Local(dir) => dir.clone(),
        Source::Git(git_source) => {
            clone = TempDir::new()?;
            let started = Instant::now();
            log.info(&format!("==> clone {} ({})", git_source.url, args.branch));
            let commit = fetch(git_source, args, clone.path(), cancel).await?;
            log.info(&format!(
                "==> clone done in {:.1}s: commit {}",
                started.elapsed().as_secs_f64(),
                job::short(&commit)
            ));
            clone.path().to_owned()
        }
    };
    if !root.join(dockerfile).is_file() {
        bail!(
            "--dockerfile: {dockerfile} not found in {} (`build` builds Dockerfiles only; the daemon uses buildpacks without one)",
            root.display()
        );
    }
    let started = Instant::now();
    log.info(&format!("==> build {} ({dockerfile}) as {}", root.display(), args.tag));
    let request = BuildRequest {
        root,
        dockerfile: dockerfile.to_owned(),
        tag: args.tag.clone(),
        cache: CacheSource::Local,
        // A local build has no deployment whose variables could be secrets.
        secrets: Default::default(),
    };
    let stats = tokio::select! {
        built = docker.build(&request, log) => built.context("build failed")?,
        () = cancel.cancelled() => bail!("interrupted"),
    };
    log.info(&format!(
        "==> build done in {:.1}s: image {} ({} files, {} bytes of context)",
        started.elapsed().as_secs_f64(),
        args.tag,
        stats.files,
        stats.bytes
    ));
    Ok(())
}

async fn fetch(
    source: &GitSource,
    args: &BuildArgs,
    dest: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<String> {
    let (source, branch, commit) = (source.clone(), args.branch.clone(), args.commit.clone());
    let (dest, cancel) = (dest.to_owned(), cancel.clone());
    tokio::task::spawn_blocking(move || {
        let request = FetchRequest {
            source: &source,
            branch: &branch,
            commit: commit.as_deref(),
        };
        git::checkout(&request, &dest, &cancel)
    })
    .await
    .context("the clone task panicked")?
    .context("clone failed")
}

enum Source {
    Local(PathBuf),
    Git(GitSource),
}

impl Source {
    /// An http(s) URL is cloned; anything else is a directory. Credentials
    /// written into the URL are moved out of it, so the URL can be printed.
    fn parse(args: &BuildArgs) -> anyhow::Result<Source> {
        let raw = args.source.as_str();
        if !(raw.starts_with("http://") || raw.starts_with("https://")) {
            let dir = Path::new(raw);
            if !dir.is_dir() {
                bail!("{raw}: not a directory (nor an http(s) git URL)");
            }
            return Ok(Source::Local(dir.canonicalize().with_context(|| raw.to_owned())?));
        }
        let mut url = Url::parse(raw).map_err(|e| anyhow::anyhow!("source: not a valid URL ({e})"))?;
        let url_user = (!url.username().is_empty()).then(|| url.username().to_owned());
        let url_password = url.password().map(str::to_owned);
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let username = args.git_username.clone().or(url_user);
        let credentials = args
            .git_password
            .clone()
            .or(url_password)
            .map(|password| (username.unwrap_or_else(|| "git".to_owned()), Secret::new(password)));
        Ok(Source::Git(GitSource {
            url: url.to_string(),
            credentials,
        }))
    }

    fn redactor(&self) -> Redactor {
        match self {
            Source::Git(GitSource {
                credentials: Some((_, password)),
                ..
            }) => Redactor::new([password.expose()]),
            _ => Redactor::default(),
        }
    }
}

/// The clone of a URL source, removed when the build is over (the crate has
/// no temp-dir dependency outside its tests).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = std::env::temp_dir().join(format!("deployra-build-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
