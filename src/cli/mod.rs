//! The command line: the daemon (`run`, also what no subcommand means, so
//! the systemd unit and existing scripts keep working) and the tools a
//! person uses around it: `check`, `enqueue` and `build`.
//!
//! The daemon's settings stay environment variables (and `.env`), read by
//! [`Config`]; flags are only for what a person types per invocation, and
//! each has an environment fallback for scripts.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use deployra_builder::config::{Config, ConfigError, QueueConfig};

mod build;
mod check;
mod daemon;
mod enqueue;

/// sysexits' EX_CONFIG: systemd and operators can tell a bad setting from a
/// crash.
pub const EX_CONFIG: u8 = 78;

/// Build worker of the Deployra platform: takes build jobs from Redis,
/// builds container images with Docker, pushes them to ECR and reports to
/// the dashboard.
///
/// Settings come from the environment and from a `.env` file in the current
/// directory (REDIS_HOST, REDIS_PORT, REDIS_PASSWORD, REDIS_QUEUE_NAME,
/// API_URL, API_KEY, AWS_REGION, WORK_DIR, ...; see the README).
#[derive(Parser)]
#[command(version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the build daemon (the default when no command is given).
    Run,
    /// Test the configuration and every dependency: Redis, the Docker
    /// Engine, ECR credentials and the dashboard API key.
    ///
    /// Prints one line per check, with what to fix when it fails. Exits 0
    /// when every check passes, 1 otherwise, 78 when the configuration
    /// itself is invalid.
    Check,
    /// Put a build job in the queue, for a running daemon to build.
    ///
    /// The job is checked with the daemon's own validation before it is
    /// pushed. Prints the deployment id on standard output.
    Enqueue(EnqueueArgs),
    /// Build one image locally: no Redis, no dashboard, no ECR.
    ///
    /// The build output and a line per step go to the terminal. For trying
    /// the builder and for debugging a repository's build.
    Build(BuildArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Provider {
    /// https://github.com/<repo>.git, with --github-token.
    Github,
    /// <git-url>/<repo>.git, with --git-username and --git-password.
    Custom,
}

#[derive(Args)]
struct EnqueueArgs {
    /// Repository name, as `owner/name`.
    #[arg(long, env = "DEPLOYRA_REPO")]
    repo: String,
    /// Branch to build.
    #[arg(long, env = "DEPLOYRA_BRANCH")]
    branch: String,
    /// Exact commit to build; the branch tip when omitted.
    #[arg(long, env = "DEPLOYRA_COMMIT")]
    commit: Option<String>,
    /// Service id; it names the ECR repository `deployra/<service>`.
    /// [default: the repository name, lower-cased, '/' replaced by '-']
    #[arg(long, env = "DEPLOYRA_SERVICE")]
    service: Option<String>,
    /// Deployment id. [default: a new `cli-...` id]
    #[arg(long, env = "DEPLOYRA_DEPLOYMENT")]
    deployment: Option<String>,
    /// Where the repository is hosted. [default: custom with --git-url,
    /// github otherwise]
    #[arg(long, value_enum, env = "DEPLOYRA_PROVIDER")]
    provider: Option<Provider>,
    /// Base URL of a custom git server (the job clones <git-url>/<repo>.git).
    #[arg(long, env = "GIT_URL")]
    git_url: Option<String>,
    /// User name for the git server (or the GitHub account).
    #[arg(long, env = "GIT_USERNAME")]
    git_username: Option<String>,
    /// Password for a custom git server. Prefer the environment variable:
    /// a flag shows in `ps`.
    #[arg(long, env = "GIT_PASSWORD", hide_env_values = true)]
    git_password: Option<String>,
    /// GitHub access token. Prefer the environment variable: a flag shows
    /// in `ps`.
    #[arg(long, env = "GITHUB_TOKEN", hide_env_values = true)]
    github_token: Option<String>,
    /// Dockerfile path inside the repository. [default: Dockerfile; built
    /// with buildpacks when it does not exist]
    #[arg(long, env = "DEPLOYRA_DOCKERFILE")]
    dockerfile: Option<String>,
    /// A variable for the app's `.env`, as KEY=VALUE; repeat for more.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// The port the app listens on (PORT for buildpack builds).
    #[arg(long, env = "DEPLOYRA_PORT")]
    port: Option<u16>,
    /// Put the job at the head of the queue, so that it runs next.
    #[arg(long)]
    next: bool,
}

#[derive(Args)]
struct BuildArgs {
    /// A local directory, or the http(s) URL of a git repository to clone.
    source: String,
    /// Dockerfile path inside the source.
    #[arg(long, env = "DEPLOYRA_DOCKERFILE", default_value = "Dockerfile")]
    dockerfile: String,
    /// Tag for the built image.
    #[arg(long, env = "DEPLOYRA_TAG", default_value = "deployra-local:latest")]
    tag: String,
    /// Branch to clone (URL sources only).
    #[arg(long, env = "DEPLOYRA_BRANCH", default_value = "main")]
    branch: String,
    /// Exact commit to check out (URL sources only).
    #[arg(long, env = "DEPLOYRA_COMMIT")]
    commit: Option<String>,
    /// User name for the git server (URL sources only).
    #[arg(long, env = "GIT_USERNAME")]
    git_username: Option<String>,
    /// Password or token for the git server (URL sources only). Prefer the
    /// environment variable: a flag shows in `ps`.
    #[arg(long, env = "GIT_PASSWORD", hide_env_values = true)]
    git_password: Option<String>,
    /// The Engine's builder: buildkit or classic, as the daemon's setting.
    #[arg(long, env = "DOCKER_BUILDER", default_value = "buildkit", value_parser = parse_builder)]
    builder: deployra_builder::image::docker::Builder,
}

fn parse_builder(arg: &str) -> Result<deployra_builder::image::docker::Builder, String> {
    deployra_builder::config::parse_builder(Some(arg)).map_err(|e| e.problem)
}

/// `--env KEY=VALUE`: split at the first '=', so values may contain '='.
fn parse_key_value(arg: &str) -> Result<(String, String), String> {
    arg.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{arg:?} is not KEY=VALUE"))
}

pub fn main(cli: Cli) -> ExitCode {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => with_config(Config::from_env(), daemon::main),
        Command::Check => with_config(Config::from_env(), |config| block_on(check::run(config))),
        Command::Enqueue(args) => with_config(QueueConfig::from_env(), |config| block_on(enqueue::run(config, args))),
        Command::Build(args) => block_on(build::run(args)),
    }
}

/// A configuration error is one line naming the variable, and EX_CONFIG.
fn with_config<C>(config: Result<C, ConfigError>, then: impl FnOnce(C) -> ExitCode) -> ExitCode {
    match config {
        Ok(config) => then(config),
        Err(e) => {
            eprintln!("deployra-builder: configuration error: {e}");
            ExitCode::from(EX_CONFIG)
        }
    }
}

/// Runs a tool command; its error is one line on standard error.
fn block_on(task: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(task));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("deployra-builder: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The registry logins builds may use: the `auths` of Docker's own config
/// file (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`).
fn registry_logins(
) -> Result<deployra_builder::image::session::Registries, deployra_builder::image::session::RegistriesError> {
    use deployra_builder::image::session::Registries;
    let path = Registries::config_path(
        std::env::var("DOCKER_CONFIG").ok().as_deref(),
        std::env::var("HOME").ok().as_deref(),
    );
    match path {
        Some(path) => Registries::load(&path),
        None => Ok(Registries::default()),
    }
}

/// The Docker Engine, connected and answering, or the error an operator
/// reads: both the daemon and `build` need it before anything else.
async fn connect_docker(
    builder: deployra_builder::image::docker::Builder,
) -> anyhow::Result<deployra_builder::image::docker::Engine> {
    use anyhow::Context;
    let registries = registry_logins()?;
    let docker = deployra_builder::image::docker::Engine::connect(builder, registries)
        .await
        .context("cannot reach the Docker Engine (DOCKER_HOST or /var/run/docker.sock)")?;
    docker
        .ping()
        .await
        .context("the Docker Engine does not answer (DOCKER_HOST or /var/run/docker.sock)")?;
    Ok(docker)
}
