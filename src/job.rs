//! The job as the dashboard enqueues it (CONTRACT section 1), and its
//! validation into a [`BuildSpec`]. Pure: no I/O.
//!
//! Parsing happens in two stages because the two kinds of bad input have
//! different owners. A payload without a usable `deploymentId` cannot be
//! reported to anyone, so it is dead-lettered ([`Unroutable`]). A payload
//! with an id but a bad field is the user's deployment failing, so it is
//! reported as FAILED naming the field ([`InvalidJob`]).

use std::fmt;

use reqwest::Url;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::error::Category;

use crate::redact::{Redactor, Secret};

/// Why a payload could not be tied to a deployment at all.
#[derive(Debug, thiserror::Error)]
pub enum Unroutable {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("deploymentId: missing")]
    MissingDeploymentId,
    #[error("deploymentId: {}", ID_RULE)]
    BadDeploymentId,
}

/// A field of an otherwise routable job is missing or invalid.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidJob {
    pub field: String,
    pub problem: String,
}

impl InvalidJob {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        InvalidJob {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Extracts the deployment id, the minimum needed to report anything.
pub fn deployment_id(raw: &str) -> Result<String, Unroutable> {
    let routing: Routing = serde_json::from_str(raw).map_err(|e| match e.classify() {
        Category::Data => Unroutable::NotAnObject,
        _ => Unroutable::NotJson(e.to_string()),
    })?;
    match routing.deployment_id {
        None | Some(serde_json::Value::Null) => Err(Unroutable::MissingDeploymentId),
        Some(serde_json::Value::String(id)) if is_valid_id(&id) => Ok(id),
        Some(_) => Err(Unroutable::BadDeploymentId),
    }
}

/// The top-level object with only `deploymentId` kept. The other fields are
/// skipped unread, as [`Job`] skips unknown ones: building them (as a
/// `serde_json::Value` would) stops at 128 levels of nesting, which would
/// dead-letter a job the full parse accepts. Written by hand because a
/// derived struct would also read a JSON array, positionally.
struct Routing {
    deployment_id: Option<serde_json::Value>,
}

impl<'de> Deserialize<'de> for Routing {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Routing;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Routing, A::Error> {
                let mut deployment_id = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "deploymentId" {
                        deployment_id = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Routing { deployment_id })
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// How many environment variables a job may have, and how large they may
/// be together: each is also a build secret and a pattern of the masker.
pub const MAX_ENV_VARS: usize = 1000;
pub const MAX_ENV_BYTES: usize = 1024 * 1024;

const ID_RULE: &str =
    "must be a non-empty string of at most 256 bytes, without control characters, and not \".\" or \"..\"";

/// The id is a path segment of every report's URL: `.` and `..` would be
/// taken as dot segments there, and every report would go elsewhere.
fn is_valid_id(id: &str) -> bool {
    !id.trim().is_empty() && id.len() <= 256 && !id.chars().any(char::is_control) && id != "." && id != ".."
}

/// The job exactly as CONTRACT.md spells it. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub deployment_id: String,
    pub service_id: Option<String>,
    pub commit_sha: Option<String>,
    pub branch: Option<String>,
    pub repository_name: Option<String>,
    pub runtime_file_path: Option<String>,
    pub git_provider: Option<GitProvider>,
    pub environment_variables: Option<Vec<EnvironmentVariable>>,
    pub ports: Option<Vec<Port>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GitProvider {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub installation_id: Option<serde_json::Value>,
    pub github_account: Option<GithubAccount>,
    pub url: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GithubAccount {
    pub username: Option<String>,
    pub access_token: Option<Secret>,
}

#[derive(Debug, Deserialize)]
pub struct EnvironmentVariable {
    pub key: String,
    pub value: Option<Secret>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    pub service_port: Option<u16>,
    pub container_port: Option<u16>,
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Where to fetch the source from. The URL never carries credentials: they
/// are handed to git through its credential callback.
#[derive(Clone, Debug)]
pub struct GitSource {
    pub url: String,
    pub credentials: Option<(String, Secret)>,
}

/// A validated job: everything the pipeline needs, nothing left to check.
#[derive(Clone, Debug)]
pub struct BuildSpec {
    pub deployment_id: String,
    pub service_id: String,
    pub repository: String,
    pub branch: String,
    /// Lower-case hex, 4 to 64 characters (a full SHA-1 or SHA-256, or an
    /// abbreviation).
    pub commit: Option<String>,
    pub source: GitSource,
    /// Relative to the checkout, normalised, never escaping it.
    pub dockerfile: String,
    pub env: Vec<(String, Secret)>,
    pub container_port: u16,
}

impl BuildSpec {
    /// Every value of this job that must never appear in a log.
    pub fn redactor(&self) -> Redactor {
        let mut secrets: Vec<&str> = self.env.iter().map(|(_, v)| v.expose()).collect();
        if let Some((_, password)) = &self.source.credentials {
            secrets.push(password.expose());
        }
        Redactor::new(secrets)
    }

    /// `owner/repo@branch` or `owner/repo@sha`, for humans.
    pub fn describe(&self) -> String {
        match &self.commit {
            Some(sha) => format!("{}@{} ({})", self.repository, self.branch, short(sha)),
            None => format!("{}@{}", self.repository, self.branch),
        }
    }
}

pub fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// Parses a routable payload into a [`Job`], naming the field whose type is
/// wrong when serde rejects it.
pub fn parse(raw: &str) -> Result<Job, InvalidJob> {
    let mut de = serde_json::Deserializer::from_str(raw);
    let job = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        // serde_json's message quotes the offending value, which may be a
        // secret; keep only its classification.
        let problem = match inner.classify() {
            Category::Data => "has the wrong type or value".to_owned(),
            _ => format!("malformed JSON ({inner})"),
        };
        InvalidJob::new(if field == "." { "job".to_owned() } else { field }, problem)
    })?;
    // Only white space may follow the object, as for serde_json::from_str.
    de.end()
        .map_err(|e| InvalidJob::new("job", format!("malformed JSON ({e})")))?;
    Ok(job)
}

impl Job {
    pub fn validate(self) -> Result<BuildSpec, InvalidJob> {
        // The worker routes first, so there this never fails; `enqueue`
        // relies on it to refuse a job the worker would dead-letter.
        if !is_valid_id(&self.deployment_id) {
            return Err(InvalidJob::new("deploymentId", ID_RULE));
        }
        let service_id = required("serviceId", self.service_id)?;
        if !is_ecr_name_component(&service_id) {
            return Err(InvalidJob::new(
                "serviceId",
                "must be lower-case letters, digits and single '.', '_' or '-' between them (it names the ECR repository)",
            ));
        }
        let repository = required("repositoryName", self.repository_name)?;
        validate_repository_name(&repository)?;
        let branch = required("branch", self.branch)?;
        validate_branch(&branch)?;
        let commit = match self.commit_sha.map(|s| s.trim().to_ascii_lowercase()) {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) if (4..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()) => Some(s),
            Some(_) => {
                return Err(InvalidJob::new(
                    "commitSha",
                    "must be a hexadecimal commit id (4 to 64 characters)",
                ))
            }
        };
        let provider = self
            .git_provider
            .ok_or_else(|| InvalidJob::new("gitProvider", "missing"))?;
        let source = git_source(provider, &repository)?;
        let dockerfile = match self.runtime_file_path {
            None => "Dockerfile".to_owned(),
            Some(p) if p.trim().is_empty() => "Dockerfile".to_owned(),
            Some(p) => normalize_relative_path(&p).ok_or_else(|| {
                InvalidJob::new(
                    "runtimeFilePath",
                    "must be a path inside the repository (no '..', not absolute)",
                )
            })?,
        };
        let variables = self.environment_variables.unwrap_or_default();
        if variables.len() > MAX_ENV_VARS {
            return Err(InvalidJob::new(
                "environmentVariables",
                format!(
                    "{} variables, more than the {MAX_ENV_VARS} a build takes",
                    variables.len()
                ),
            ));
        }
        let size: usize = variables
            .iter()
            .map(|v| v.key.len() + v.value.as_ref().map_or(0, |value| value.expose().len()))
            .sum();
        if size > MAX_ENV_BYTES {
            return Err(InvalidJob::new(
                "environmentVariables",
                format!("{size} bytes of names and values, more than the {MAX_ENV_BYTES} a build takes"),
            ));
        }
        let mut env = Vec::new();
        for (i, var) in variables.into_iter().enumerate() {
            if !is_env_key(&var.key) {
                // Not quoted: a value pasted where the name goes is still
                // a secret.
                return Err(InvalidJob::new(
                    format!("environmentVariables[{i}].key"),
                    "is not a valid variable name (letters, digits, '_', not starting with a digit)",
                ));
            }
            env.push((var.key, var.value.unwrap_or_default()));
        }
        let container_port = self
            .ports
            .unwrap_or_default()
            .first()
            .and_then(|p| p.container_port)
            .unwrap_or(3000);
        Ok(BuildSpec {
            deployment_id: self.deployment_id,
            service_id,
            repository,
            branch,
            commit,
            source,
            dockerfile,
            env,
            container_port,
        })
    }
}

fn required(field: &str, value: Option<String>) -> Result<String, InvalidJob> {
    match value {
        Some(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        _ => Err(InvalidJob::new(field, "missing")),
    }
}

fn git_source(provider: GitProvider, repository: &str) -> Result<GitSource, InvalidJob> {
    let kind = provider
        .kind
        .ok_or_else(|| InvalidJob::new("gitProvider.type", "missing"))?;
    match kind.to_ascii_uppercase().as_str() {
        "GITHUB" => {
            let account = provider
                .github_account
                .ok_or_else(|| InvalidJob::new("gitProvider.githubAccount", "missing"))?;
            let token = account
                .access_token
                .filter(|t| !t.expose().is_empty())
                .ok_or_else(|| InvalidJob::new("gitProvider.githubAccount.accessToken", "missing"))?;
            let username = account
                .username
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "x-access-token".to_owned());
            Ok(GitSource {
                url: format!("https://github.com/{repository}.git"),
                credentials: Some((username, token)),
            })
        }
        "CUSTOM" => {
            let base = provider
                .url
                .filter(|u| !u.trim().is_empty())
                .ok_or_else(|| InvalidJob::new("gitProvider.url", "missing (required for a CUSTOM provider)"))?;
            let mut base = Url::parse(base.trim()).map_err(|_| InvalidJob::new("gitProvider.url", "not a URL"))?;
            if !matches!(base.scheme(), "http" | "https") {
                return Err(InvalidJob::new("gitProvider.url", "must be an http:// or https:// URL"));
            }
            // The repository path is appended to the URL: after a query or
            // fragment it would end up inside it.
            if base.query().is_some() || base.fragment().is_some() {
                return Err(InvalidJob::new(
                    "gitProvider.url",
                    "must not have a query (?) or fragment (#)",
                ));
            }
            // Credentials written into the URL are moved out of it, so that
            // the URL can be logged.
            let url_user = (!base.username().is_empty()).then(|| base.username().to_owned());
            let url_password = base.password().map(|p| Secret::new(p.to_owned()));
            let _ = base.set_username("");
            let _ = base.set_password(None);
            let username = provider.username.filter(|u| !u.is_empty()).or(url_user);
            let password = provider.password.filter(|p| !p.expose().is_empty()).or(url_password);
            let credentials = match (username, password) {
                (None, None) => None,
                (username, Some(password)) => Some((username.unwrap_or_else(|| "git".to_owned()), password)),
                (Some(_), None) => {
                    return Err(InvalidJob::new(
                        "gitProvider.password",
                        "missing (a username was given)",
                    ))
                }
            };
            let base = base.as_str().trim_end_matches('/').to_owned();
            Ok(GitSource {
                url: format!("{base}/{repository}.git"),
                credentials,
            })
        }
        _ => Err(InvalidJob::new(
            "gitProvider.type",
            format!("{kind:?} is not a known provider (GITHUB or CUSTOM)"),
        )),
    }
}

fn validate_repository_name(name: &str) -> Result<(), InvalidJob> {
    let ok = name.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg.chars().all(|c| c.is_ascii_alphanumeric() || "-_.~".contains(c))
    });
    if ok {
        Ok(())
    } else {
        Err(InvalidJob::new(
            "repositoryName",
            "must be owner/name segments of letters, digits, '-', '_', '.', '~'",
        ))
    }
}

fn validate_branch(branch: &str) -> Result<(), InvalidJob> {
    let bad = branch.starts_with('-')
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains("@{")
        || branch.chars().any(|c| c.is_control() || " ~^:?*[\\".contains(c));
    if bad {
        Err(InvalidJob::new("branch", "is not a valid git branch name"))
    } else {
        Ok(())
    }
}

/// `a/./b//Dockerfile` → `a/b/Dockerfile`; `None` for anything that is
/// absolute or goes through `..`.
pub fn normalize_relative_path(path: &str) -> Option<String> {
    let path = path.trim();
    if path.starts_with('/') || path.starts_with('\\') || path.contains('\0') {
        return None;
    }
    let mut parts = Vec::new();
    for seg in path.split(['/', '\\']) {
        match seg {
            "" | "." => {}
            ".." => return None,
            s => parts.push(s),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn is_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// ECR allows `[a-z0-9]+(?:[._-][a-z0-9]+)*` per path component.
fn is_ecr_name_component(name: &str) -> bool {
    name.len() <= 200
        && name
            .split(['.', '_', '-'])
            .all(|run| !run.is_empty() && run.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT_EXAMPLE: &str = r#"{
      "deploymentId": "dep_123",
      "serviceId": "svc_456",
      "commitSha": "9fceb02d0ae598e95dc970b74767f19372d61af8",
      "branch": "main",
      "repositoryName": "acme/web",
      "runtimeFilePath": "docker/Dockerfile.prod",
      "gitProvider": {
        "type": "GITHUB",
        "installationId": "123",
        "githubAccount": { "username": "octo", "accessToken": "gho_secret" },
        "url": null, "username": null, "password": null
      },
      "environmentVariables": [ { "key": "NODE_ENV", "value": "production" } ],
      "ports": [ { "servicePort": 80, "containerPort": 3000 } ],
      "someFutureField": {"nested": true}
    }"#;

    fn spec(raw: &str) -> Result<BuildSpec, InvalidJob> {
        parse(raw)?.validate()
    }

    fn with(patch: serde_json::Value) -> String {
        let mut job: serde_json::Value = serde_json::from_str(CONTRACT_EXAMPLE).unwrap();
        merge(&mut job, patch);
        job.to_string()
    }

    fn merge(target: &mut serde_json::Value, patch: serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(&k);
                    } else {
                        merge(t.entry(k).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            (t, p) => *t = p,
        }
    }

    #[test]
    fn the_contract_example_parses() {
        let s = spec(CONTRACT_EXAMPLE).unwrap();
        assert_eq!(s.deployment_id, "dep_123");
        assert_eq!(s.service_id, "svc_456");
        assert_eq!(s.source.url, "https://github.com/acme/web.git");
        let (user, token) = s.source.credentials.as_ref().unwrap();
        assert_eq!((user.as_str(), token.expose()), ("octo", "gho_secret"));
        assert_eq!(s.commit.as_deref(), Some("9fceb02d0ae598e95dc970b74767f19372d61af8"));
        assert_eq!(s.dockerfile, "docker/Dockerfile.prod");
        assert_eq!(s.env[0].0, "NODE_ENV");
        assert_eq!(s.container_port, 3000);
        assert!(!format!("{s:?}").contains("gho_secret"));
    }

    #[test]
    fn optional_fields_may_be_null_or_absent() {
        let raw = r#"{"deploymentId":"d","serviceId":"s","branch":"main","repositoryName":"a/b",
            "gitProvider":{"type":"custom","url":"http://git.local:8418/"},
            "commitSha":null,"runtimeFilePath":null,"environmentVariables":null,"ports":null}"#;
        let s = spec(raw).unwrap();
        assert_eq!(s.source.url, "http://git.local:8418/a/b.git");
        assert!(s.source.credentials.is_none());
        assert_eq!(s.commit, None);
        assert_eq!(s.dockerfile, "Dockerfile");
        assert!(s.env.is_empty());
        assert_eq!(s.container_port, 3000);
        let minimal = r#"{"deploymentId":"d","serviceId":"s","branch":"main","repositoryName":"a/b","commitSha":"",
            "gitProvider":{"type":"CUSTOM","url":"https://git.example.com/base","username":"u","password":"p"}}"#;
        let s = spec(minimal).unwrap();
        assert_eq!(s.source.url, "https://git.example.com/base/a/b.git");
        assert_eq!(s.commit, None);
    }

    #[test]
    fn credentials_in_a_custom_url_move_to_the_callback() {
        let raw =
            with(serde_json::json!({"gitProvider": {"type": "CUSTOM", "url": "https://bob:hunter22@git.example.com"}}));
        let s = spec(&raw).unwrap();
        assert_eq!(s.source.url, "https://git.example.com/acme/web.git");
        let (user, pw) = s.source.credentials.unwrap();
        assert_eq!((user.as_str(), pw.expose()), ("bob", "hunter22"));
    }

    #[test]
    fn unknown_fields_nested_past_serde_json_s_recursion_limit_are_skipped() {
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        let raw = with(serde_json::json!({}));
        let raw = format!(r#"{{"someFutureField":{deep},{}"#, &raw[1..]);
        assert_eq!(deployment_id(&raw).unwrap(), "dep_123");
        assert_eq!(spec(&raw).unwrap().deployment_id, "dep_123");
    }

    #[test]
    fn a_deployment_id_routing_refuses_is_invalid_too() {
        for id in ["", " ", "a\nb", &"x".repeat(257), &"\u{fffd}".repeat(90), ".", ".."] {
            let raw = with(serde_json::json!({ "deploymentId": id }));
            assert!(
                matches!(deployment_id(&raw), Err(Unroutable::BadDeploymentId)),
                "{id:?}"
            );
            assert_eq!(spec(&raw).unwrap_err().field, "deploymentId", "{id:?}");
        }
    }

    #[test]
    fn trailing_characters_make_a_payload_unroutable_and_invalid() {
        let raw = format!("{CONTRACT_EXAMPLE}]}}");
        assert!(matches!(deployment_id(&raw), Err(Unroutable::NotJson(_))));
        assert_eq!(spec(&raw).unwrap_err().field, "job");
        assert!(spec(&format!("{CONTRACT_EXAMPLE}\n")).is_ok());
    }

    #[test]
    fn unroutable_payloads() {
        assert!(matches!(deployment_id("not json"), Err(Unroutable::NotJson(_))));
        assert!(matches!(
            deployment_id("{\"deploymentId\":"),
            Err(Unroutable::NotJson(_))
        ));
        assert!(matches!(deployment_id("[1,2]"), Err(Unroutable::NotAnObject)));
        assert!(matches!(deployment_id("\"dep_1\""), Err(Unroutable::NotAnObject)));
        assert!(matches!(deployment_id("null"), Err(Unroutable::NotAnObject)));
        assert!(matches!(
            deployment_id(r#"{"serviceId":"x"}"#),
            Err(Unroutable::MissingDeploymentId)
        ));
        assert!(matches!(
            deployment_id(r#"{"deploymentId":null}"#),
            Err(Unroutable::MissingDeploymentId)
        ));
        assert!(matches!(
            deployment_id(r#"{"deploymentId":""}"#),
            Err(Unroutable::BadDeploymentId)
        ));
        assert!(matches!(
            deployment_id(r#"{"deploymentId":42}"#),
            Err(Unroutable::BadDeploymentId)
        ));
        assert_eq!(deployment_id(CONTRACT_EXAMPLE).unwrap(), "dep_123");
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            (serde_json::json!({"repositoryName": null}), "repositoryName"),
            (serde_json::json!({"repositoryName": "../etc"}), "repositoryName"),
            (serde_json::json!({"serviceId": null}), "serviceId"),
            (serde_json::json!({"serviceId": "Svc_Upper"}), "serviceId"),
            (serde_json::json!({"branch": null}), "branch"),
            (serde_json::json!({"branch": "a..b"}), "branch"),
            (serde_json::json!({"commitSha": "not-hex"}), "commitSha"),
            (
                serde_json::json!({"runtimeFilePath": "../../etc/passwd"}),
                "runtimeFilePath",
            ),
            (serde_json::json!({"runtimeFilePath": "/etc/passwd"}), "runtimeFilePath"),
            (serde_json::json!({"runtimeFilePath": "a/../../b"}), "runtimeFilePath"),
            (serde_json::json!({"gitProvider": null}), "gitProvider"),
            (
                serde_json::json!({"gitProvider": {"type": "BITBUCKET"}}),
                "gitProvider.type",
            ),
            (
                serde_json::json!({"gitProvider": {"type": "CUSTOM", "url": null}}),
                "gitProvider.url",
            ),
            (
                serde_json::json!({"gitProvider": {"type": "CUSTOM", "url": "https://git.example.com/scm?x"}}),
                "gitProvider.url",
            ),
            (
                serde_json::json!({"gitProvider": {"type": "CUSTOM", "url": "https://git.example.com/scm#top"}}),
                "gitProvider.url",
            ),
            (
                serde_json::json!({"gitProvider": {"githubAccount": null}}),
                "gitProvider.githubAccount",
            ),
            (
                serde_json::json!({"environmentVariables": [{"key": "BAD KEY", "value": "v"}]}),
                "environmentVariables[0].key",
            ),
            (serde_json::json!({"ports": "eighty"}), "ports"),
            (
                serde_json::json!({"environmentVariables": (0..=MAX_ENV_VARS)
                    .map(|i| serde_json::json!({"key": format!("V{i}"), "value": "x"}))
                    .collect::<Vec<_>>()}),
                "environmentVariables",
            ),
            (
                serde_json::json!({"environmentVariables": [{"key": "BIG", "value": "x".repeat(MAX_ENV_BYTES)}]}),
                "environmentVariables",
            ),
            (
                serde_json::json!({"ports": [{"containerPort": 70000}]}),
                "ports[0].containerPort",
            ),
        ];
        for (patch, field) in cases {
            let raw = with(patch.clone());
            let err = spec(&raw).unwrap_err();
            assert_eq!(err.field, field, "{patch} → {err}");
            assert!(!err.to_string().contains("BAD KEY"), "{err}");
        }
    }

    #[test]
    fn wrong_type_errors_do_not_quote_values() {
        let raw = with(serde_json::json!({"gitProvider": {"githubAccount": {"accessToken": 12345678}}}));
        let err = spec(&raw).unwrap_err();
        assert_eq!(err.field, "gitProvider.githubAccount.accessToken");
        assert!(!err.to_string().contains("12345678"), "{err}");
    }

    #[test]
    fn runtime_file_path_is_normalised() {
        assert_eq!(
            normalize_relative_path("./docker//Dockerfile.prod").as_deref(),
            Some("docker/Dockerfile.prod")
        );
        assert_eq!(normalize_relative_path("a/./b"), Some("a/b".to_owned()));
        assert_eq!(normalize_relative_path("../x"), None);
        assert_eq!(normalize_relative_path("/x"), None);
        assert_eq!(normalize_relative_path("."), None);
    }

    #[test]
    fn secrets_of_a_job_feed_the_redactor() {
        let raw = with(
            serde_json::json!({"environmentVariables": [{"key": "DB_URL", "value": "postgres://u:pw-9876@db/x"}]}),
        );
        let r = spec(&raw).unwrap().redactor();
        assert_eq!(
            r.redact("url=postgres://u:pw-9876@db/x token=gho_secret"),
            "url=*** token=***"
        );
    }
}
