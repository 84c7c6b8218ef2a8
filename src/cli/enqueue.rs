//! `deployra-builder enqueue`: writes the job JSON of CONTRACT section 1 so
//! that nobody types it into redis-cli, and refuses locally, naming the
//! flag, what the daemon would fail.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use deployra_builder::config::QueueConfig;
use deployra_builder::job;
use deployra_builder::queue;
use serde_json::{json, Value};

use super::{EnqueueArgs, Provider};

/// Redis is local or close; longer means it is not there.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(config: QueueConfig, args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let deployment_id = args.deployment.clone().unwrap_or_else(new_deployment_id);
    let payload = job_json(&deployment_id, &args).to_string();
    // The daemon's own checks, so that what passes here builds there.
    job::deployment_id(&payload).map_err(|e| anyhow::anyhow!("--deployment: {e}"))?;
    job::parse(&payload)
        .and_then(job::Job::validate)
        .map_err(|e| anyhow::anyhow!("{} ({}): {}", flag_for(&e.field), e.field, e.problem))?;

    let push = async {
        let client = queue::client(&config.redis)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd(if args.next { "LPUSH" } else { "RPUSH" })
            .arg(&config.queue_name)
            .arg(&payload)
            .query_async::<i64>(&mut conn)
            .await
    };
    let fix = || {
        format!(
            "cannot push to Redis at {}:{} (check REDIS_HOST/REDIS_PORT/REDIS_PASSWORD)",
            config.redis.host, config.redis.port
        )
    };
    let length = tokio::time::timeout(REDIS_TIMEOUT, push)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {}s", REDIS_TIMEOUT.as_secs()))
        .with_context(fix)?
        .with_context(fix)?;
    let place = if args.next { "head" } else { "tail" };
    eprintln!(
        "queued {} on {} ({place}; {length} waiting)",
        args.repo, config.queue_name
    );
    // Alone on standard output, for `id=$(deployra-builder enqueue ...)`.
    println!("{deployment_id}");
    Ok(ExitCode::SUCCESS)
}

/// Unique enough for a person's deployments: time to the nanosecond and
/// the process id.
fn new_deployment_id() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "cli-{:x}{:08x}-{}",
        now.as_secs(),
        now.subsec_nanos(),
        std::process::id()
    )
}

/// `acme/Web` builds as service `acme-web`.
fn default_service(repo: &str) -> String {
    repo.trim().to_ascii_lowercase().replace('/', "-")
}

fn job_json(deployment_id: &str, args: &EnqueueArgs) -> Value {
    let provider = args.provider.unwrap_or(match args.git_url {
        Some(_) => Provider::Custom,
        None => Provider::Github,
    });
    let git_provider = match provider {
        Provider::Github => json!({
            "type": "GITHUB",
            "githubAccount": { "username": args.git_username, "accessToken": args.github_token },
        }),
        Provider::Custom => json!({
            "type": "CUSTOM",
            "url": args.git_url,
            "username": args.git_username,
            "password": args.git_password,
        }),
    };
    let env: Vec<Value> = args.env.iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
    let ports: Vec<Value> = args
        .port
        .map(|p| json!({ "servicePort": p, "containerPort": p }))
        .into_iter()
        .collect();
    json!({
        "deploymentId": deployment_id,
        "serviceId": args.service.clone().unwrap_or_else(|| default_service(&args.repo)),
        "commitSha": args.commit.clone().unwrap_or_default(),
        "branch": args.branch,
        "repositoryName": args.repo,
        "runtimeFilePath": args.dockerfile,
        "gitProvider": git_provider,
        "environmentVariables": env,
        "ports": ports,
    })
}

/// The flag a job field came from, for the error message.
fn flag_for(field: &str) -> &'static str {
    match field {
        "serviceId" => "--service",
        "repositoryName" => "--repo",
        "branch" => "--branch",
        "commitSha" => "--commit",
        "runtimeFilePath" => "--dockerfile",
        "gitProvider.url" => "--git-url",
        "gitProvider.username" => "--git-username",
        "gitProvider.password" => "--git-password",
        "gitProvider.githubAccount.accessToken" => "--github-token",
        f if f.starts_with("environmentVariables") => "--env",
        f if f.starts_with("gitProvider") => "--provider",
        _ => "job",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_is_derived_from_the_repository() {
        assert_eq!(default_service("Acme/Web"), "acme-web");
    }

    #[test]
    fn fields_map_to_their_flags() {
        assert_eq!(flag_for("environmentVariables[2].key"), "--env");
        assert_eq!(flag_for("gitProvider.githubAccount.accessToken"), "--github-token");
        assert_eq!(flag_for("serviceId"), "--service");
    }
}
