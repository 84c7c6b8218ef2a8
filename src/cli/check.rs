//! `deployra-builder check`: tries each dependency the daemon needs, the way
//! the daemon uses it, and says what to fix. Every check is bounded, so an
//! address that swallows packets gives a FAIL line, not a hang.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use deployra_builder::config::Config;
use deployra_builder::dashboard::{Dashboard, LogLine, LogType, ReportError, RetryPolicy};
use deployra_builder::image::docker::{Builder, Engine};
use deployra_builder::image::pack::{self, PackError};
use deployra_builder::image::session::Registries;
use deployra_builder::queue;
use deployra_builder::redact::Redactor;
use deployra_builder::registry::ecr::Ecr;
use reqwest::StatusCode;

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The deployment the dashboard probe reports to. No real id looks like
/// this, so a dashboard that accepts the key answers 404 and nothing is
/// recorded against a real deployment.
const PROBE_DEPLOYMENT: &str = "deployra-builder-check";

/// One attempt: `check` reports what it sees now; retrying is the daemon's
/// business.
const ONE_ATTEMPT: RetryPolicy = RetryPolicy {
    attempts: 1,
    first_delay: Duration::ZERO,
    max_delay: Duration::ZERO,
};

pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    // The error texts come from other libraries; none should hold a
    // secret, but a line printed to a terminal (or pasted in a ticket)
    // is masked anyway.
    let mut secrets = vec![config.api_key.expose().to_owned()];
    secrets.extend(config.redis.password.as_ref().map(|p| p.expose().to_owned()));
    secrets.extend(std::env::var("AWS_SECRET_ACCESS_KEY").ok());
    let redactor = Redactor::new(secrets);
    let mut failed = false;
    let mut report = |what: String, result: Result<(), String>| {
        let line = match result {
            Ok(()) => format!("ok   {what}"),
            Err(problem) => {
                failed = true;
                format!("FAIL {what}: {problem}")
            }
        };
        println!("{}", redactor.redact(&line));
    };

    report("configuration".to_owned(), Ok(()));
    let redis = format!("redis {}:{}", config.redis.host, config.redis.port);
    report(redis, bounded(check_redis(&config)).await);
    report("docker".to_owned(), bounded(check_docker(config.docker_builder)).await);
    match super::registry_logins() {
        Ok(logins) => {
            let mut hosts: Vec<_> = logins.hosts().collect();
            hosts.sort_unstable();
            let hosts = if hosts.is_empty() {
                "none".to_owned()
            } else {
                hosts.join(", ")
            };
            report(format!("registry logins for builds: {hosts}"), Ok(()));
        }
        Err(e) => report(
            "registry logins for builds".to_owned(),
            Err(format!("{e} — fix the file or point DOCKER_CONFIG at another")),
        ),
    }
    report(
        format!("ecr credentials ({})", config.aws_region),
        bounded(check_ecr()).await,
    );
    report(
        format!("dashboard {}", config.api_url),
        bounded(check_dashboard(&config)).await,
    );
    match bounded(check_pack(&config.pack_bin)).await {
        Ok(version) => report(format!("pack {version} ({})", config.pack_bin), Ok(())),
        Err(problem) => report(format!("pack ({})", config.pack_bin), Err(problem)),
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn bounded<T>(check: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())))
}

async fn check_redis(config: &Config) -> Result<(), String> {
    let fix = "is Redis running? check REDIS_HOST/REDIS_PORT/REDIS_USERNAME/REDIS_PASSWORD";
    let client = queue::client(&config.redis).map_err(|e| format!("{e} — {fix}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("{e} — {fix}"))?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map(drop)
        .map_err(|e| format!("{e} — {fix}"))
}

async fn check_docker(builder: Builder) -> Result<(), String> {
    let fix = "is the Docker Engine running, and may this user use it? check DOCKER_HOST or /var/run/docker.sock";
    let engine = Engine::connect(builder, Registries::default())
        .await
        .map_err(|e| format!("{e} — {fix}"))?;
    engine.ping().await.map_err(|e| format!("{e} — {fix}"))
}

/// GetAuthorizationToken, the call every push starts with: it needs working
/// credentials and region, and no repository.
async fn check_ecr() -> Result<(), String> {
    let fix = "check AWS_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the instance role) and ecr:GetAuthorizationToken permission";
    Ecr::from_env()
        .await
        .push_credentials("this account's registry")
        .await
        .map(drop)
        .map_err(|e| format!("{e} — {fix}"))
}

/// Posts a log line for [`PROBE_DEPLOYMENT`]. The API checks the key before
/// it looks the deployment up (CONTRACT section 3), so:
/// - 401/403: the key is wrong;
/// - 404 (no such deployment), 2xx, 400/422 (the probe's body refused): the
///   key got past authentication;
/// - anything else, or no answer: the dashboard is not usable right now.
///
/// A 404 could also come from an API_URL with a wrong path; the ok line
/// says which answer was seen, so that can still be told.
async fn check_dashboard(config: &Config) -> Result<(), String> {
    let dashboard = Dashboard::new(config.api_url.clone(), config.api_key.clone()).map_err(|e| e.to_string())?;
    let probe = LogLine {
        text: "deployra-builder check: testing the API key".to_owned(),
        kind: LogType::Info,
    };
    match dashboard.logs(PROBE_DEPLOYMENT, &probe, ONE_ATTEMPT).await {
        Ok(()) | Err(ReportError::UnknownDeployment(_)) => Ok(()),
        Err(ReportError::Rejected { status, .. })
            if status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY =>
        {
            Ok(())
        }
        Err(ReportError::Unauthorized) => {
            Err("dashboard rejected API_KEY (401/403) — set API_KEY to the dashboard's builder key".to_owned())
        }
        Err(e) => Err(format!("{e} — is the dashboard up? check API_URL")),
    }
}

/// Repositories without a Dockerfile are built by pack: a builder without
/// it fails those builds, so its absence is a FAIL, not a warning.
async fn check_pack(pack_bin: &str) -> Result<String, String> {
    pack::version(pack_bin).await.map_err(|e| match e {
        PackError::NotInstalled { .. } => format!("{e}; without it, repositories that have no Dockerfile fail"),
        other => other.to_string(),
    })
}
