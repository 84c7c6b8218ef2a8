//! Builds an image with Cloud Native Buildpacks through the `pack` CLI, for
//! repositories that have no Dockerfile. pack builds into the local Docker
//! daemon, so the image it leaves behind is tagged and pushed like any other.
//!
//! pack is a program, not an API, so cancelling means stopping a process
//! tree: pack runs in its own process group, and a cancel sends SIGTERM to
//! the whole group (pack then removes its build container), then SIGKILL to
//! whatever is left after [`TERM_GRACE`]. The signals go through rustix's
//! safe `kill_process_group`, so the runtime image needs no `kill` program.
//!
//! The job's environment values are secrets, and a command line is readable
//! by every user of the machine (`ps`). They go to pack through a 0600
//! `--env-file` in the temp directory instead, removed when pack is done.
//! pack reads that file by splitting it on newlines and trimming each line,
//! so a value holding a newline, or starting or ending with white space,
//! cannot be written there; only such values are passed as `--env KEY`, with
//! the value in pack's own environment, which only its user can read (the
//! output of the build is still masked by the [`LogSink`]'s redactor).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::docker::PLATFORM;
use super::lines::LineBuffer;
use crate::dashboard::{LogSink, LogType};
use crate::redact::{Redactor, Secret};

/// The Paketo builder for Ubuntu 22.04. `paketobuildpacks/builder:base`
/// (Bionic) is deprecated and no longer updated.
pub const DEFAULT_BUILDER: &str = "paketobuildpacks/builder-jammy-base";
pub const DEFAULT_PACK_BIN: &str = "pack";
/// The port an app is told to listen on when the job names none.
pub const DEFAULT_PORT: u16 = 3000;

/// pack reacts to SIGTERM by removing its build container, which takes the
/// engine a moment; SIGKILL would leave that container running.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// A process that left pack's group could hold the output pipes open
/// forever; once pack has exited its output gets this long to end.
const DRAIN: Duration = Duration::from_secs(2);

const READ_CHUNK: usize = 8 * 1024;

pub struct PackRequest {
    /// `PACK_BIN`: a name looked up on `PATH`, or a path.
    pub pack_bin: String,
    /// `PAKETO_BUILDER`.
    pub builder: String,
    /// The checkout.
    pub root: PathBuf,
    /// The tag to produce, such as `<repositoryUri>:<commit>`.
    pub image: String,
    /// Passed as `PORT`; it wins over a `PORT` in `env`, since the platform
    /// routes traffic to this port.
    pub port: u16,
    /// Build-time environment; names are the job's validated names.
    pub env: Vec<(String, Secret)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error(
        "pack CLI not found (PACK_BIN={bin}): install it from \
         https://buildpacks.io/docs/for-platform-operators/how-to/integrate-ci/pack/ or set PACK_BIN to its path"
    )]
    NotInstalled { bin: String },
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the build environment file {}: {source}", path.display())]
    EnvFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lost track of the pack process: {source}")]
    Wait {
        #[source]
        source: io::Error,
    },
    #[error("pack build failed ({status}): {}", last_line.as_deref().unwrap_or("no output"))]
    Failed {
        status: ExitStatus,
        /// pack's verdict is its last line on stderr; without one, the last
        /// line on stdout. Secrets of the request are masked.
        last_line: Option<String>,
    },
    #[error("cancelled")]
    Cancelled,
}

/// `pack --version`, for `deployra-builder check`: whether PACK_BIN runs,
/// and which release it is.
pub async fn version(pack_bin: &str) -> Result<String, PackError> {
    let out = Command::new(pack_bin)
        .arg("--version")
        .env_clear()
        .envs(inherited_env())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| spawn_error(pack_bin, e))?;
    let last_line = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_owned())
    };
    if !out.status.success() {
        return Err(PackError::Failed {
            status: out.status,
            last_line: last_line(&out.stderr).or_else(|| last_line(&out.stdout)),
        });
    }
    Ok(last_line(&out.stdout).unwrap_or_default())
}

/// Runs `pack build` and streams its output to `log` line by line, stdout
/// as STDOUT and stderr as STDERR. On success the image `req.image` is in
/// the local Docker daemon.
///
/// Prefer cancelling through `cancel`, which lets pack clean up; dropping
/// the future instead kills the process group at once.
pub async fn build(req: &PackRequest, log: &LogSink, cancel: &CancellationToken) -> Result<(), PackError> {
    if cancel.is_cancelled() {
        return Err(PackError::Cancelled);
    }
    let plan = EnvPlan::new(&req.env);
    if plan.port_overridden {
        log.info(&format!(
            "PORT is set to the service's container port {}; the PORT environment variable is not passed to pack",
            req.port
        ));
    }
    let env_file = if plan.file.is_empty() {
        None
    } else {
        Some(EnvFile::write(&plan.file)?)
    };
    log.info(&format!(
        "Building with Cloud Native Buildpacks: pack build {} --builder {} --platform {PLATFORM}",
        req.image, req.builder
    ));

    let mut child = Command::new(&req.pack_bin)
        .args(arguments(req, env_file.as_ref().map(EnvFile::path), &plan.flags()))
        .env_clear()
        .envs(inherited_env())
        .envs(plan.environ.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .map_err(|e| spawn_error(&req.pack_bin, e))?;
    let mut group = ProcessGroup::new(child.id());
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    let exited = CancellationToken::new();
    let drained = || async {
        exited.cancelled().await;
        tokio::time::sleep(DRAIN).await;
    };
    let supervise = async {
        let outcome = tokio::select! {
            status = child.wait() => Some(status),
            () = cancel.cancelled() => {
                group.terminate(&mut child).await;
                None
            }
        };
        group.kill_stragglers();
        exited.cancel();
        outcome
    };
    let (stdout_last, stderr_last, outcome) = tokio::join!(
        pump(stdout, LogType::Stdout, log, drained()),
        pump(stderr, LogType::Stderr, log, drained()),
        supervise,
    );
    group.disarm();
    drop(env_file);

    match outcome {
        None => Err(PackError::Cancelled),
        Some(Err(source)) => Err(PackError::Wait { source }),
        Some(Ok(status)) if status.success() => Ok(()),
        Some(Ok(status)) => {
            let redactor = Redactor::new(req.env.iter().map(|(_, value)| value.expose()));
            Err(PackError::Failed {
                status,
                last_line: stderr_last.or(stdout_last).map(|line| redactor.redact(&line)),
            })
        }
    }
}

fn arguments(req: &PackRequest, env_file: Option<&Path>, argv_env: &[String]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["build".into(), (&req.image).into(), "--path".into(), (&req.root).into()];
    for arg in [
        "--builder",
        &req.builder,
        "--platform",
        PLATFORM,
        "--trust-builder",
        "--pull-policy",
        "if-not-present",
        "--no-color",
    ] {
        args.push(arg.into());
    }
    if let Some(file) = env_file {
        args.push("--env-file".into());
        args.push(file.into());
    }
    for item in argv_env {
        args.push("--env".into());
        args.push(item.into());
    }
    args.push("--env".into());
    args.push(format!("PORT={}", req.port).into());
    args
}

fn spawn_error(bin: &str, source: io::Error) -> PackError {
    // ENOENT for a path that exists means its interpreter is missing: pack
    // is there, and "install pack" would be the wrong advice.
    let missing = source.kind() == io::ErrorKind::NotFound && !(bin.contains('/') && Path::new(bin).exists());
    if missing {
        PackError::NotInstalled { bin: bin.to_owned() }
    } else {
        PackError::Spawn {
            bin: bin.to_owned(),
            source,
        }
    }
}

/// How each variable reaches pack: in the env file; by name (`--env KEY`)
/// with its value in pack's own environment, which only pack's user can
/// read; or, for the few names pack's own environment already uses
/// (`PATH`, `DOCKER_HOST`, ...), as `KEY=VALUE` on the command line.
struct EnvPlan<'a> {
    file: Vec<(&'a str, &'a str)>,
    environ: Vec<(&'a str, &'a str)>,
    argv: Vec<String>,
    port_overridden: bool,
}

impl<'a> EnvPlan<'a> {
    fn new(env: &'a [(String, Secret)]) -> Self {
        let mut plan = EnvPlan {
            file: Vec::new(),
            environ: Vec::new(),
            argv: Vec::new(),
            port_overridden: false,
        };
        for (key, value) in env {
            let value = value.expose();
            if key == "PORT" {
                plan.port_overridden = true;
            } else if fits_env_file(value) {
                plan.file.push((key, value));
            } else if !is_inherited(key) {
                plan.environ.push((key, value));
            } else {
                plan.argv.push(format!("{key}={value}"));
            }
        }
        plan
    }

    /// The `--env` arguments other than the file and PORT.
    fn flags(&self) -> Vec<String> {
        let by_name = self.environ.iter().map(|(key, _)| (*key).to_owned());
        by_name.chain(self.argv.iter().cloned()).collect()
    }
}

/// pack reads an env file with Go's `strings.Split(content, "\n")` and
/// `strings.TrimSpace(line)`; Go and Rust agree on what white space is
/// (Unicode `White_Space`).
fn fits_env_file(value: &str) -> bool {
    !value.contains('\n') && !value.starts_with(char::is_whitespace) && !value.ends_with(char::is_whitespace)
}

/// The env file, deleted on drop so that no exit path leaves secrets in the
/// temp directory.
struct EnvFile {
    path: PathBuf,
}

impl EnvFile {
    fn write(vars: &[(&str, &str)]) -> Result<EnvFile, PackError> {
        let (mut file, env_file) = Self::create()?;
        let mut content = String::new();
        for (key, value) in vars {
            content.push_str(key);
            content.push('=');
            content.push_str(value);
            content.push('\n');
        }
        file.write_all(content.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| PackError::EnvFile {
                path: env_file.path.clone(),
                source,
            })?;
        Ok(env_file)
    }

    /// `create_new` refuses an existing name, so nobody can plant a file or a
    /// symlink there for us to write secrets into; a taken name is skipped.
    fn create() -> Result<(File, EnvFile), PackError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let mut attempt = 0;
        loop {
            let name = format!(
                "deployra-pack-env-{}-{}-{nanos:x}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
                Ok(file) => return Ok((file, EnvFile { path })),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
                Err(source) => return Err(PackError::EnvFile { path, source }),
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for EnvFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove pack's env file");
            }
        }
    }
}

/// pack's process group (its id is pack's pid). Until disarmed, dropping it
/// kills the group, so that a dropped [`build`] leaves nothing running.
struct ProcessGroup {
    pgid: Option<u32>,
}

impl ProcessGroup {
    fn new(pid: Option<u32>) -> Self {
        ProcessGroup { pgid: pid }
    }

    /// SIGTERM to the group; SIGKILL if pack is still there after
    /// [`TERM_GRACE`]. Should the group be gone, pack itself is still
    /// killed (tokio's `start_kill`).
    async fn terminate(&self, child: &mut Child) {
        let Some(pgid) = self.pgid else { return };
        if !signal_group(pgid, Signal::TERM) {
            let _ = child.start_kill();
        }
        if tokio::time::timeout(TERM_GRACE, child.wait()).await.is_err() {
            tracing::warn!(pgid, "pack did not stop within {TERM_GRACE:?} of SIGTERM; killing it");
            if !signal_group(pgid, Signal::KILL) {
                let _ = child.start_kill();
            }
            let _ = child.wait().await;
        }
    }

    /// Once pack has exited, nothing it started may outlive the build.
    fn kill_stragglers(&self) {
        if let Some(pgid) = self.pgid {
            signal_group(pgid, Signal::KILL);
        }
    }

    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            signal_group(pgid, Signal::KILL);
        }
    }
}

/// The daemon's own environment holds secrets (API_KEY, AWS and Redis
/// credentials) that pack and the buildpacks it runs have no business
/// seeing; only what a CLI needs to find its tools, the Docker Engine and a
/// proxy is passed on.
fn inherited_env() -> impl Iterator<Item = (OsString, OsString)> {
    std::env::vars_os().filter(|(name, _)| name.to_str().is_some_and(is_inherited))
}

fn is_inherited(name: &str) -> bool {
    const PASSED: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "LC_ALL",
        "TMPDIR",
        "TZ",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    ];
    PASSED.contains(&name) || name.starts_with("DOCKER_") || name.starts_with("PACK_")
}

/// Whether the signal was delivered: false when the group is gone already
/// (ESRCH, the usual case for a straggler sweep) or cannot be signalled.
fn signal_group(pgid: u32, signal: Signal) -> bool {
    let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    match kill_process_group(pid, signal) {
        Ok(()) => true,
        Err(rustix::io::Errno::SRCH) => false,
        Err(e) => {
            tracing::warn!(pgid, error = %e, "cannot signal pack's process group");
            false
        }
    }
}

/// Forwards each line of `reader` to `log` until end of file or until
/// `stop` completes; returns the last non-empty line.
async fn pump(
    mut reader: impl AsyncRead + Unpin,
    kind: LogType,
    log: &LogSink,
    stop: impl Future<Output = ()>,
) -> Option<String> {
    let mut lines = LineBuffer::default();
    let mut last = None;
    let mut emit = |line: String| {
        if !line.trim().is_empty() {
            last = Some(line.clone());
        }
        log.line(kind, &line);
    };
    let mut chunk = vec![0u8; READ_CHUNK];
    tokio::pin!(stop);
    loop {
        let read = tokio::select! {
            read = reader.read(&mut chunk) => read,
            () = &mut stop => break,
        };
        match read {
            Ok(0) => break,
            Ok(n) => lines.push(&chunk[..n], &mut emit),
            Err(e) => {
                tracing::warn!(error = %e, "reading pack's output failed");
                break;
            }
        }
    }
    if let Some(rest) = lines.finish() {
        emit(rest);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_values_pack_reads_back_exactly_go_to_the_env_file() {
        for value in [
            "production",
            "",
            "a=b=c",
            "has spaces  inside",
            "quote ' \" $HOME # x",
            "tab\tinside",
        ] {
            assert!(fits_env_file(value), "{value:?}");
        }
        for value in ["multi\nline", " leading", "trailing ", "crlf\r", "\u{a0}nbsp", "ends\t"] {
            assert!(!fits_env_file(value), "{value:?}");
        }
    }

    #[test]
    fn port_comes_from_the_request_and_argv_holds_no_file_value() {
        let req = PackRequest {
            pack_bin: "pack".into(),
            builder: DEFAULT_BUILDER.into(),
            root: "/work/checkout".into(),
            image: "repo:abc".into(),
            port: 3000,
            env: vec![
                ("NODE_ENV".to_owned(), Secret::new("production")),
                ("PORT".to_owned(), Secret::new("8080")),
                ("CERT".to_owned(), Secret::new("line1\nline2")),
            ],
        };
        let plan = EnvPlan::new(&req.env);
        assert_eq!(plan.file, [("NODE_ENV", "production")]);
        assert_eq!(plan.environ, [("CERT", "line1\nline2")]);
        assert!(plan.argv.is_empty());
        assert!(plan.port_overridden);

        let args: Vec<String> = arguments(&req, Some(Path::new("/tmp/env")), &plan.flags())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "build",
                "repo:abc",
                "--path",
                "/work/checkout",
                "--builder",
                "paketobuildpacks/builder-jammy-base",
                "--platform",
                "linux/amd64",
                "--trust-builder",
                "--pull-policy",
                "if-not-present",
                "--no-color",
                "--env-file",
                "/tmp/env",
                "--env",
                "CERT",
                "--env",
                "PORT=3000",
            ]
        );
    }

    #[test]
    fn env_file_is_private_and_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let file = EnvFile::write(&[("A", "one two"), ("B", "x=y")]).unwrap();
        let path = file.path().to_owned();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "A=one two\nB=x=y\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn a_missing_binary_is_not_installed_with_advice() {
        let e = spawn_error("/nonexistent/pack", io::Error::from(io::ErrorKind::NotFound));
        assert!(matches!(e, PackError::NotInstalled { .. }));
        assert!(e.to_string().contains("install it from https://buildpacks.io/"), "{e}");
        let e = spawn_error("/bin/sh", io::Error::from(io::ErrorKind::NotFound));
        assert!(matches!(e, PackError::Spawn { .. }), "{e}");
    }
}
