//! The daemon's settings, read once from the environment (and an optional
//! `.env`, loaded by `main`) and validated before any work starts. The names
//! are those of the builder we replace, so operators' files keep working.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;

use crate::image::cache::CacheConfig;
use crate::image::docker::Builder;
use crate::image::pack;
use crate::redact::Secret;

/// A setting that is missing or malformed; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(var: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            var,
            problem: problem.into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub redis: RedisSettings,
    pub queue_name: String,
    pub cancel_channel: String,
    /// Base URL of the dashboard API, without a trailing slash.
    pub api_url: Url,
    pub api_key: Secret,
    /// `BUILD_LOG_MAX_BYTES`: build output shipped per build; past it, lines
    /// are counted and one "N lines omitted" line ends the log.
    pub log_max_bytes: usize,
    pub aws_region: String,
    pub work_dir: PathBuf,
    pub log_level: String,
    pub build_timeout: Duration,
    /// How many builds run at once.
    pub concurrency: usize,
    /// On SIGTERM, how long running builds may take to finish before they
    /// are stopped and put back in the queue.
    pub shutdown_grace: Duration,
    /// Layer reuse across builds of a service.
    pub cache: CacheConfig,
    /// `DOCKER_BUILDER`: BuildKit (the default) or the classic builder.
    pub docker_builder: Builder,
    /// The `pack` CLI, for repositories without a Dockerfile.
    pub pack_bin: String,
    pub paketo_builder: String,
    /// Names this worker's processing list in Redis; stable across restarts
    /// of the same host so that a restarted daemon finds its interrupted jobs.
    pub worker_id: String,
    /// Where `/metrics` and `/healthz` listen; unset, nothing listens.
    pub metrics_addr: Option<SocketAddr>,
}

/// The settings needed to put a job in the queue, and no more: `enqueue`
/// runs where a person works, which need not have the dashboard key or AWS
/// credentials.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    pub redis: RedisSettings,
    pub queue_name: String,
}

impl QueueConfig {
    pub fn from_env() -> Result<QueueConfig, ConfigError> {
        QueueConfig::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<QueueConfig, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let or_default = |name: &str, default: &str| get(name).unwrap_or_else(|| default.to_owned());
        Ok(QueueConfig {
            redis: RedisSettings {
                host: or_default("REDIS_HOST", "127.0.0.1"),
                port: parse_number("REDIS_PORT", get("REDIS_PORT"), 6379)?,
                username: get("REDIS_USERNAME"),
                password: get("REDIS_PASSWORD").map(Secret::new),
            },
            queue_name: or_default("REDIS_QUEUE_NAME", "builder-queue"),
        })
    }
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests need not touch the process
    /// environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let or_default = |name: &str, default: &str| get(name).unwrap_or_else(|| default.to_owned());

        let QueueConfig { redis, queue_name } = QueueConfig::from_lookup(&lookup)?;

        let api_url = get("API_URL").ok_or_else(|| {
            ConfigError::new(
                "API_URL",
                "not set; the dashboard API base URL, e.g. http://127.0.0.1:3000/api",
            )
        })?;
        let api_url = parse_api_url(&api_url)?;
        let api_key = get("API_KEY")
            .map(Secret::new)
            .ok_or_else(|| ConfigError::new("API_KEY", "not set; the key the dashboard API expects in x-api-key"))?;
        let aws_region = get("AWS_REGION").ok_or_else(|| {
            ConfigError::new(
                "AWS_REGION",
                "not set; the AWS region of the ECR registry, e.g. us-east-1",
            )
        })?;

        let log_level = or_default("LOG_LEVEL", "info");
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::new(
                "LOG_LEVEL",
                format!("{log_level:?} is not a level (error, warn, info, debug, trace) or a filter"),
            ));
        }

        let bounded =
            |var: &'static str, default: u64, range: RangeInclusive<u64>| parse_bounded(var, get(var), default, range);
        let build_timeout_secs = bounded("BUILD_TIMEOUT_SECS", 3600, LIMITS.build_timeout_secs)?;
        let concurrency = bounded("BUILD_CONCURRENCY", 1, LIMITS.concurrency)? as usize;
        let shutdown_grace_secs = bounded("SHUTDOWN_GRACE_SECS", 300, LIMITS.shutdown_grace_secs)?;
        let log_max_bytes = bounded("BUILD_LOG_MAX_BYTES", 8 * 1024 * 1024, LIMITS.log_max_bytes)? as usize;
        let min_free_bytes = bounded("BUILD_CACHE_MIN_FREE_GB", 10, LIMITS.min_free_gb)? * 1024 * 1024 * 1024;
        let worker_id = get("WORKER_ID").unwrap_or_else(default_worker_id);
        let valid_id = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        if !worker_id.chars().all(valid_id) || worker_id.starts_with('.') {
            return Err(ConfigError::new(
                "WORKER_ID",
                "must be letters, digits, '.', '_' or '-' (it names a directory and Redis keys)",
            ));
        }

        let docker_builder = parse_builder(get("DOCKER_BUILDER").as_deref())?;
        let metrics_addr = get("METRICS_ADDR").map(|v| parse_metrics_addr(&v)).transpose()?;

        Ok(Config {
            redis,
            queue_name,
            cancel_channel: or_default("REDIS_CANCEL_CHANNEL_NAME", "builder:cancel"),
            api_url,
            api_key,
            aws_region,
            work_dir: PathBuf::from(or_default("WORK_DIR", "/tmp/builds")),
            log_level,
            build_timeout: Duration::from_secs(build_timeout_secs),
            concurrency,
            shutdown_grace: Duration::from_secs(shutdown_grace_secs),
            worker_id,
            log_max_bytes,
            cache: CacheConfig {
                enabled: parse_switch("BUILD_CACHE", get("BUILD_CACHE"), true)?,
                min_free_bytes,
            },
            docker_builder,
            pack_bin: or_default("PACK_BIN", pack::DEFAULT_PACK_BIN),
            paketo_builder: or_default("PAKETO_BUILDER", pack::DEFAULT_BUILDER),
            metrics_addr,
        })
    }
}

/// `DOCKER_BUILDER`: `buildkit` (the default) or `classic`.
pub fn parse_builder(value: Option<&str>) -> Result<Builder, ConfigError> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("buildkit") => Ok(Builder::BuildKit),
        Some("classic") => Ok(Builder::Classic),
        Some(other) => Err(ConfigError::new(
            "DOCKER_BUILDER",
            format!("{other:?} is not a builder: buildkit or classic"),
        )),
    }
}

/// The range of every numeric setting: past these, durations overflow,
/// Redis refuses expiry times, and sizes stop meaning anything.
pub struct Limits {
    pub build_timeout_secs: RangeInclusive<u64>,
    pub concurrency: RangeInclusive<u64>,
    pub shutdown_grace_secs: RangeInclusive<u64>,
    pub log_max_bytes: RangeInclusive<u64>,
    pub min_free_gb: RangeInclusive<u64>,
}

pub const LIMITS: Limits = Limits {
    // A week.
    build_timeout_secs: 1..=604_800,
    concurrency: 1..=64,
    // A day.
    shutdown_grace_secs: 0..=86_400,
    // 1 GiB.
    log_max_bytes: 0..=1 << 30,
    // 1 PiB.
    min_free_gb: 0..=1 << 20,
};

fn parse_bounded(
    var: &'static str,
    value: Option<String>,
    default: u64,
    range: RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    let n = parse_number(var, value, default)?;
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(ConfigError::new(
            var,
            format!("{n} is out of range: {} to {}", range.start(), range.end()),
        ))
    }
}

fn parse_number<T: std::str::FromStr>(var: &'static str, value: Option<String>, default: T) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| ConfigError::new(var, format!("{v:?} is not a valid number"))),
    }
}

fn parse_switch(var: &'static str, value: Option<String>, default: bool) -> Result<bool, ConfigError> {
    match value.as_deref().map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if matches!(v.as_str(), "1" | "true" | "on" | "yes") => Ok(true),
        Some(v) if matches!(v.as_str(), "0" | "false" | "off" | "no") => Ok(false),
        Some(v) => Err(ConfigError::new(
            var,
            format!("{v:?} is not on/off, true/false, yes/no or 1/0"),
        )),
    }
}

/// An IP address and port, not a host name: what it resolves to could
/// change between restarts and expose the endpoints where nobody meant to.
fn parse_metrics_addr(value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::new(
            "METRICS_ADDR",
            format!("{value:?} is not an IP address and port such as 127.0.0.1:9102"),
        )
    })
}

fn parse_api_url(value: &str) -> Result<Url, ConfigError> {
    let url =
        Url::parse(value.trim_end_matches('/')).map_err(|e| ConfigError::new("API_URL", format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::new("API_URL", "must be an http:// or https:// URL"));
    }
    if url.password().is_some() || !url.username().is_empty() {
        return Err(ConfigError::new(
            "API_URL",
            "must not carry credentials; the API key goes in API_KEY",
        ));
    }
    Ok(url)
}

fn default_worker_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "builder".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    const MINIMAL: &[(&str, &str)] = &[
        ("API_URL", "http://127.0.0.1:3000/api/"),
        ("API_KEY", "k"),
        ("AWS_REGION", "us-east-1"),
    ];

    #[test]
    fn minimal_config_gets_the_old_builders_defaults() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.queue_name, "builder-queue");
        assert_eq!(c.cancel_channel, "builder:cancel");
        assert_eq!(c.redis.host, "127.0.0.1");
        assert_eq!(c.redis.port, 6379);
        assert_eq!(c.api_url.as_str(), "http://127.0.0.1:3000/api");
        assert_eq!(c.work_dir, PathBuf::from("/tmp/builds"));
        assert_eq!(c.build_timeout, Duration::from_secs(3600));
        assert_eq!(c.concurrency, 1);
        assert_eq!(c.shutdown_grace, Duration::from_secs(300));
        assert!(c.cache.enabled);
        assert_eq!(c.metrics_addr, None);
    }

    #[test]
    fn the_largest_values_allowed_are_taken() {
        let mut vars = MINIMAL.to_vec();
        vars.extend([
            ("BUILD_TIMEOUT_SECS", "604800"),
            ("BUILD_CONCURRENCY", "64"),
            ("SHUTDOWN_GRACE_SECS", "86400"),
            ("BUILD_LOG_MAX_BYTES", "1073741824"),
            ("BUILD_CACHE_MIN_FREE_GB", "1048576"),
        ]);
        let c = load(&vars).unwrap();
        assert_eq!(c.build_timeout, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.concurrency, 64);
        assert_eq!(c.shutdown_grace, Duration::from_secs(24 * 3600));
        assert_eq!(c.log_max_bytes, 1 << 30);
        assert_eq!(c.cache.min_free_bytes, 1 << 50);
        let mut vars = MINIMAL.to_vec();
        vars.push(("BUILD_TIMEOUT_SECS", "18446744073709551615"));
        assert_eq!(
            load(&vars).unwrap_err().to_string(),
            "BUILD_TIMEOUT_SECS: 18446744073709551615 is out of range: 1 to 604800"
        );
    }

    #[test]
    fn metrics_addr_takes_ipv4_and_ipv6() {
        for addr in ["127.0.0.1:9102", "[::1]:9102", "0.0.0.0:9102"] {
            let mut vars = MINIMAL.to_vec();
            vars.push(("METRICS_ADDR", addr));
            assert_eq!(load(&vars).unwrap().metrics_addr, Some(addr.parse().unwrap()));
        }
    }

    #[test]
    fn each_required_setting_is_named_when_missing() {
        for missing in ["API_URL", "API_KEY", "AWS_REGION"] {
            let vars: Vec<_> = MINIMAL.iter().copied().filter(|(k, _)| *k != missing).collect();
            let err = load(&vars).unwrap_err();
            assert_eq!(err.var, missing);
            assert!(err.to_string().starts_with(missing), "{err}");
        }
    }

    #[test]
    fn malformed_values_are_named() {
        let cases = [
            ("REDIS_PORT", "sixty"),
            ("REDIS_PORT", "70000"),
            ("API_URL", "not a url"),
            ("API_URL", "ftp://x/api"),
            ("API_URL", "https://user:pw@host/api"),
            ("LOG_LEVEL", "loud=="),
            ("BUILD_TIMEOUT_SECS", "0"),
            ("BUILD_TIMEOUT_SECS", "-5"),
            ("BUILD_CONCURRENCY", "0"),
            ("BUILD_CONCURRENCY", "many"),
            ("SHUTDOWN_GRACE_SECS", "soon"),
            ("METRICS_ADDR", "9102"),
            ("METRICS_ADDR", "localhost:9102"),
            ("METRICS_ADDR", "127.0.0.1:99999"),
            ("BUILD_CACHE", "maybe"),
            ("DOCKER_BUILDER", "kaniko"),
            ("BUILD_LOG_MAX_BYTES", "big"),
            ("WORKER_ID", "../escape"),
            ("WORKER_ID", "has space"),
            ("BUILD_CACHE_MIN_FREE_GB", "lots"),
            ("BUILD_CACHE_MIN_FREE_GB", "99999999999"),
            ("BUILD_TIMEOUT_SECS", "0"),
            ("BUILD_TIMEOUT_SECS", "18446744073709551615"),
            ("BUILD_TIMEOUT_SECS", "9300000000000000"),
            ("BUILD_TIMEOUT_SECS", "604801"),
            ("SHUTDOWN_GRACE_SECS", "86401"),
            ("BUILD_LOG_MAX_BYTES", "1073741825"),
            ("BUILD_CACHE_MIN_FREE_GB", "1048577"),
        ];
        for (var, value) in cases {
            let mut vars: Vec<_> = MINIMAL.iter().copied().filter(|(k, _)| *k != var).collect();
            vars.push((var, value));
            let err = load(&vars).unwrap_err();
            assert_eq!(err.var, var, "{var}={value}: {err}");
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let mut vars = MINIMAL.to_vec();
        vars.push(("REDIS_PASSWORD", "redis-pw-123"));
        vars.push(("API_KEY", "api-key-456"));
        let c = load(&vars).unwrap();
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("redis-pw-123") && !debug.contains("api-key-456"),
            "{debug}"
        );
    }
}
