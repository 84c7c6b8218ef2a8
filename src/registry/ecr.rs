//! ECR's control plane: the repository `deployra/<serviceId>` with its
//! keep-one-image lifecycle policy, and the short-lived push credentials.
//! Credentials, region and `AWS_ENDPOINT_URL` come from the AWS SDK's own
//! configuration chain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_ecr::error::DisplayErrorContext;
use aws_sdk_ecr::Client;
use base64::Engine;

use crate::redact::Secret;

/// CONTRACT section 4, verbatim.
pub const LIFECYCLE_POLICY: &str = r#"{"rules":[{"rulePriority":1,"description":"Keep only 1 image","selection":{"tagStatus":"any","countType":"imageCountMoreThan","countNumber":1},"action":{"type":"expire"}}]}"#;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("ECR {operation} for {repository} failed: {message}")]
    Api {
        operation: &'static str,
        repository: String,
        message: String,
    },
    #[error("ECR authorization token is unusable: {0}")]
    BadToken(&'static str),
}

/// Credentials for `docker push` to ECR.
#[derive(Clone, Debug)]
pub struct PushCredentials {
    pub username: String,
    pub password: Secret,
    /// The registry host, without scheme.
    pub server: String,
}

/// ECR answers that hold for a while, so that a build does not wait for
/// them again: repository URIs (a repository is never deleted by us) and the
/// authorization token (valid for 12 hours).
#[derive(Clone, Default)]
struct Remembered {
    repositories: Arc<Mutex<HashMap<String, String>>>,
    token: Arc<Mutex<Option<(PushCredentials, Instant)>>>,
}

/// A token is renewed this long before ECR says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(30 * 60);

#[derive(Clone)]
pub struct Ecr {
    client: Client,
    remembered: Remembered,
}

fn registry_host(repository_uri: &str) -> String {
    repository_uri
        .split_once('/')
        .map_or(repository_uri, |(host, _)| host)
        .to_owned()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().expect("ECR cache lock poisoned")
}

pub fn repository_name(service_id: &str) -> String {
    format!("deployra/{service_id}")
}

impl Ecr {
    pub async fn from_env() -> Ecr {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        Ecr {
            client: Client::new(&config),
            remembered: Remembered::default(),
        }
    }

    /// Returns the repository URI, creating the repository (with its
    /// lifecycle policy) when it does not exist yet.
    pub async fn ensure_repository(&self, name: &str) -> Result<String, RegistryError> {
        if let Some(uri) = lock(&self.remembered.repositories).get(name) {
            return Ok(uri.clone());
        }
        let uri = self.find_or_create(name).await?;
        lock(&self.remembered.repositories).insert(name.to_owned(), uri.clone());
        Ok(uri)
    }

    async fn find_or_create(&self, name: &str) -> Result<String, RegistryError> {
        let api = |operation: &'static str, message: String| RegistryError::Api {
            operation,
            repository: name.to_owned(),
            message,
        };
        match self.client.describe_repositories().repository_names(name).send().await {
            Ok(out) => {
                if let Some(uri) = out.repositories().first().and_then(|r| r.repository_uri()) {
                    return Ok(uri.to_owned());
                }
            }
            Err(e) => {
                let not_found = e
                    .as_service_error()
                    .is_some_and(|s| s.is_repository_not_found_exception());
                if !not_found {
                    return Err(api("DescribeRepositories", DisplayErrorContext(&e).to_string()));
                }
            }
        }
        let uri = match self.client.create_repository().repository_name(name).send().await {
            Ok(out) => out
                .repository()
                .and_then(|r| r.repository_uri())
                .map(str::to_owned)
                .ok_or_else(|| api("CreateRepository", "answer has no repository URI".to_owned()))?,
            // Another builder created it a moment ago; it sets the policy.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_repository_already_exists_exception()) =>
            {
                return self.describe_uri(name).await;
            }
            Err(e) => return Err(api("CreateRepository", DisplayErrorContext(&e).to_string())),
        };
        self.client
            .put_lifecycle_policy()
            .repository_name(name)
            .lifecycle_policy_text(LIFECYCLE_POLICY)
            .send()
            .await
            .map_err(|e| api("PutLifecyclePolicy", DisplayErrorContext(&e).to_string()))?;
        tracing::info!(
            repository = name,
            uri,
            "created ECR repository with keep-one lifecycle policy"
        );
        Ok(uri)
    }

    async fn describe_uri(&self, name: &str) -> Result<String, RegistryError> {
        let out = self
            .client
            .describe_repositories()
            .repository_names(name)
            .send()
            .await
            .map_err(|e| RegistryError::Api {
                operation: "DescribeRepositories",
                repository: name.to_owned(),
                message: DisplayErrorContext(&e).to_string(),
            })?;
        out.repositories()
            .first()
            .and_then(|r| r.repository_uri())
            .map(str::to_owned)
            .ok_or_else(|| RegistryError::Api {
                operation: "DescribeRepositories",
                repository: name.to_owned(),
                message: "answer has no repository URI".to_owned(),
            })
    }

    pub async fn push_credentials(&self, repository_uri: &str) -> Result<PushCredentials, RegistryError> {
        let server = registry_host(repository_uri);
        if let Some((credentials, renew_at)) = lock(&self.remembered.token).as_ref() {
            if credentials.server == server && Instant::now() < *renew_at {
                return Ok(credentials.clone());
            }
        }
        let (credentials, valid_for) = self.fetch_token(repository_uri).await?;
        let renew_at = Instant::now() + valid_for.saturating_sub(TOKEN_MARGIN);
        *lock(&self.remembered.token) = Some((credentials.clone(), renew_at));
        Ok(credentials)
    }

    async fn fetch_token(&self, repository_uri: &str) -> Result<(PushCredentials, Duration), RegistryError> {
        let out = self
            .client
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| RegistryError::Api {
                operation: "GetAuthorizationToken",
                repository: repository_uri.to_owned(),
                message: DisplayErrorContext(&e).to_string(),
            })?;
        let data = out
            .authorization_data()
            .first()
            .ok_or(RegistryError::BadToken("no authorization data"))?;
        let token = data
            .authorization_token()
            .ok_or(RegistryError::BadToken("no authorization token"))?;
        let valid_for = data
            .expires_at()
            .and_then(|at| SystemTime::try_from(*at).ok())
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|_| RegistryError::BadToken("not base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| RegistryError::BadToken("not UTF-8"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or(RegistryError::BadToken("not user:password"))?;
        let credentials = PushCredentials {
            username: username.to_owned(),
            password: Secret::new(password),
            server: registry_host(repository_uri),
        };
        Ok((credentials, valid_for))
    }
}
