//! ECR's control plane: the repository `deployra/<serviceId>` with its
//! keep-one-image lifecycle policy, and the short-lived push credentials.
//! Credentials, region and `AWS_ENDPOINT_URL` come from the AWS SDK's own
//! configuration chain.

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

#[derive(Clone)]
pub struct Ecr {
    client: Client,
}

pub fn repository_name(service_id: &str) -> String {
    format!("deployra/{service_id}")
}

impl Ecr {
    pub async fn from_env() -> Ecr {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        Ecr {
            client: Client::new(&config),
        }
    }

    /// Returns the repository URI, creating the repository (with its
    /// lifecycle policy) when it does not exist yet.
    pub async fn ensure_repository(&self, name: &str) -> Result<String, RegistryError> {
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
        let token = out
            .authorization_data()
            .first()
            .and_then(|d| d.authorization_token())
            .ok_or(RegistryError::BadToken("no authorization data"))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|_| RegistryError::BadToken("not base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| RegistryError::BadToken("not UTF-8"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or(RegistryError::BadToken("not user:password"))?;
        let server = repository_uri
            .split_once('/')
            .map_or(repository_uri, |(host, _)| host)
            .to_owned();
        Ok(PushCredentials {
            username: username.to_owned(),
            password: Secret::new(password),
            server,
        })
    }
}
