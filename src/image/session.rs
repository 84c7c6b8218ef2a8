//! The BuildKit session deployra-builder serves to the Engine for one build.
//!
//! BuildKit calls back into the client that started a build for what only
//! the client may give. This session answers:
//!
//! - `Secrets.GetSecret(id)` with the job's environment variable of that
//!   name, so that `RUN --mount=type=secret,id=DATABASE_URL` reads its value
//!   at `/run/secrets/DATABASE_URL`, in that step only: BuildKit mounts it
//!   on a tmpfs, never into a layer. Any other id is NotFound.
//! - `Auth.Credentials(host)` from the operator's Docker config (`auths` of
//!   `$DOCKER_CONFIG/config.json`), for private base images and a Docker Hub
//!   login. Never for an ECR registry: ECR's credentials reach every
//!   repository of the account, every service's image among them, and a
//!   Dockerfile is written by whoever owns the repository. The builder
//!   fetches its own service's image itself.
//! - Health, which BuildKit checks to keep the session.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use bollard::errors::Error as DockerError;
use bollard::health::health_check_response::ServingStatus;
use bollard::health::health_server::{Health, HealthServer};
use bollard::health::{HealthCheckRequest, HealthCheckResponse, HealthListRequest, HealthListResponse};
use bollard::moby::buildkit::secrets::v1::secrets_server::{Secrets, SecretsServer};
use bollard::moby::buildkit::secrets::v1::{GetSecretRequest, GetSecretResponse};
use bollard::moby::filesync::v1::auth_server::{Auth, AuthServer};
use bollard::moby::filesync::v1::{
    CredentialsRequest, CredentialsResponse, FetchTokenRequest, FetchTokenResponse, GetTokenAuthorityRequest,
    GetTokenAuthorityResponse, VerifyTokenAuthorityRequest, VerifyTokenAuthorityResponse,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use super::engine_conn::EngineApi;
use crate::redact::Secret;
use crate::task::AbortOnDrop;

/// The methods this session serves, as the Engine is told of them.
const METHODS: [&str; 3] = [
    "/grpc.health.v1.Health/Check",
    "/moby.buildkit.secrets.v1.Secrets/GetSecret",
    "/moby.filesync.v1.Auth/Credentials",
];

/// A build secret's largest size, as BuildKit's own clients allow.
const MAX_SECRET: usize = 500 * 1024;

/// The job's build secrets, by id.
pub type BuildSecrets = Arc<HashMap<String, Secret>>;

/// A running session; dropping it ends it.
pub type Session = AbortOnDrop<()>;

/// Opens the session `id` on the Engine and serves it until dropped.
pub async fn start(
    api: &EngineApi,
    id: &str,
    secrets: BuildSecrets,
    registries: Arc<Registries>,
) -> Result<Session, DockerError> {
    let methods: Vec<String> = METHODS.iter().map(|m| (*m).to_owned()).collect();
    let connection = api.open_session(id, &methods).await?;
    let router = tonic::transport::Server::builder()
        .add_service(HealthServer::new(Healthy))
        .add_service(SecretsServer::new(JobSecrets(secrets)))
        .add_service(AuthServer::new(OperatorAuth(registries)));
    let incoming = futures_util::stream::iter([Ok::<_, io::Error>(SessionIo(connection))]);
    Ok(AbortOnDrop::spawn(async move {
        if let Err(e) = router.serve_with_incoming(incoming).await {
            tracing::debug!(error = %e, "the BuildKit session ended with an error");
        }
    }))
}

/// The upgraded `/session` connection, as tonic's server takes one.
struct SessionIo(TokioIo<hyper::upgrade::Upgraded>);

impl Connected for SessionIo {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SessionIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

struct Healthy;

#[tonic::async_trait]
impl Health for Healthy {
    async fn check(&self, _: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    async fn list(&self, _: Request<HealthListRequest>) -> Result<Response<HealthListResponse>, Status> {
        Err(Status::unimplemented("list"))
    }

    type WatchStream = futures_util::stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

struct JobSecrets(BuildSecrets);

#[tonic::async_trait]
impl Secrets for JobSecrets {
    async fn get_secret(&self, request: Request<GetSecretRequest>) -> Result<Response<GetSecretResponse>, Status> {
        let id = &request.get_ref().id;
        match self.0.get(id) {
            Some(value) if value.expose().len() > MAX_SECRET => Err(Status::invalid_argument(format!(
                "the secret {id} is larger than {MAX_SECRET} bytes"
            ))),
            Some(value) => Ok(Response::new(GetSecretResponse {
                data: value.expose().as_bytes().to_vec(),
            })),
            None => Err(Status::not_found(format!(
                "no secret {id}: build secrets are the deployment's environment variables"
            ))),
        }
    }
}

struct OperatorAuth(Arc<Registries>);

#[tonic::async_trait]
impl Auth for OperatorAuth {
    async fn credentials(&self, request: Request<CredentialsRequest>) -> Result<Response<CredentialsResponse>, Status> {
        let answer = match self.0.credentials(&request.get_ref().host) {
            Some(login) => CredentialsResponse {
                username: login.username.clone(),
                secret: login.password.expose().to_owned(),
            },
            // Anonymous: BuildKit pulls without credentials.
            None => CredentialsResponse::default(),
        };
        Ok(Response::new(answer))
    }

    async fn fetch_token(&self, _: Request<FetchTokenRequest>) -> Result<Response<FetchTokenResponse>, Status> {
        Err(Status::unimplemented("BuildKit asks for credentials instead"))
    }

    async fn get_token_authority(
        &self,
        _: Request<GetTokenAuthorityRequest>,
    ) -> Result<Response<GetTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("get_token_authority"))
    }

    async fn verify_token_authority(
        &self,
        _: Request<VerifyTokenAuthorityRequest>,
    ) -> Result<Response<VerifyTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("verify_token_authority"))
    }
}

/// A registry login from the operator's Docker config.
#[derive(Clone, Debug)]
pub struct Login {
    pub username: String,
    pub password: Secret,
}

/// The registry logins builds may use, by host.
#[derive(Clone, Debug, Default)]
pub struct Registries {
    logins: HashMap<String, Login>,
}

/// The operator's Docker config could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct RegistriesError {
    pub path: PathBuf,
    pub problem: String,
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl Registries {
    /// Where Docker's CLI keeps its config: `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`.
    pub fn config_path(docker_config: Option<&str>, home: Option<&str>) -> Option<PathBuf> {
        match (docker_config.filter(|d| !d.is_empty()), home.filter(|h| !h.is_empty())) {
            (Some(dir), _) => Some(Path::new(dir).join("config.json")),
            (None, Some(home)) => Some(Path::new(home).join(".docker/config.json")),
            (None, None) => None,
        }
    }

    /// The `auths` of a Docker config file; none when there is no file.
    /// ECR hosts are left out whatever the file says.
    pub fn load(path: &Path) -> Result<Registries, RegistriesError> {
        let error = |problem: String| RegistriesError {
            path: path.to_owned(),
            problem,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Registries::default()),
            Err(e) => return Err(error(e.to_string())),
        };
        let config: DockerConfig =
            serde_json::from_str(&text).map_err(|e| error(format!("not a Docker config file: {e}")))?;
        let mut logins = HashMap::new();
        for (key, entry) in config.auths {
            let host = normalize_host(&key);
            if is_ecr(&host) {
                continue;
            }
            let login = match (entry.auth, entry.username, entry.password) {
                (_, Some(username), Some(password)) => Login {
                    username,
                    password: Secret::new(password),
                },
                (Some(auth), _, _) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .ok()
                        .and_then(|d| String::from_utf8(d).ok())
                        .ok_or_else(|| error(format!("auths.{key}.auth is not base64 of user:password")))?;
                    let (username, password) = decoded
                        .split_once(':')
                        .ok_or_else(|| error(format!("auths.{key}.auth is not base64 of user:password")))?;
                    Login {
                        username: username.to_owned(),
                        password: Secret::new(password),
                    }
                }
                _ => continue,
            };
            logins.insert(host, login);
        }
        Ok(Registries { logins })
    }

    /// The hosts builds may log in to.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.logins.keys().map(String::as_str)
    }

    pub fn credentials(&self, host: &str) -> Option<&Login> {
        let host = normalize_host(host);
        if is_ecr(&host) {
            return None;
        }
        self.logins.get(&host)
    }
}

/// `https://index.docker.io/v1/`, `docker.io` and `registry-1.docker.io`
/// are one registry; other keys lose their scheme and path.
fn normalize_host(key: &str) -> String {
    let host = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = host.split('/').next().unwrap_or(host).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "docker.io" => "registry-1.docker.io".to_owned(),
        _ => host,
    }
}

/// `<account>.dkr.ecr.<region>.amazonaws.com` (or `.com.cn`, or FIPS).
fn is_ecr(host: &str) -> bool {
    let host = host.split(':').next().unwrap_or(host);
    (host.contains(".dkr.ecr.") || host.contains(".dkr.ecr-fips."))
        && (host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registries(json: &str) -> Registries {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        Registries::load(&path).unwrap()
    }

    #[test]
    fn logins_come_from_auths_and_never_for_ecr() {
        let auth = base64::engine::general_purpose::STANDARD.encode("robot:s3cret:with-colon");
        let r = registries(&format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                "registry.example.com:5000": {{"username": "u", "password": "p"}},
                "123456789012.dkr.ecr.us-east-1.amazonaws.com": {{"auth": "{auth}"}},
                "empty.example.com": {{}}
            }}, "credsStore": "desktop"}}"#
        ));
        let hub = r.credentials("registry-1.docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.expose()),
            ("robot", "s3cret:with-colon")
        );
        assert_eq!(r.credentials("registry.example.com:5000").unwrap().username, "u");
        assert!(r.credentials("123456789012.dkr.ecr.us-east-1.amazonaws.com").is_none());
        assert!(r.credentials("empty.example.com").is_none());
        assert!(r.credentials("other.example.com").is_none());
        let mut hosts: Vec<_> = r.hosts().collect();
        hosts.sort();
        assert_eq!(hosts, ["registry-1.docker.io", "registry.example.com:5000"]);
    }

    #[test]
    fn a_missing_file_is_no_logins_and_a_broken_one_an_error() {
        assert_eq!(
            Registries::load(Path::new("/does/not/exist.json"))
                .unwrap()
                .hosts()
                .count(),
            0
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = Registries::load(&path).unwrap_err();
        assert!(e.to_string().starts_with(&path.display().to_string()), "{e}");
        std::fs::write(&path, r#"{"auths": {"x.io": {"auth": "bm9jb2xvbg=="}}}"#).unwrap();
        assert!(Registries::load(&path).is_err(), "user:password without a colon");
    }

    #[test]
    fn ecr_hosts_are_recognised() {
        assert!(is_ecr("123456789012.dkr.ecr.us-east-1.amazonaws.com"));
        assert!(is_ecr("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn"));
        assert!(is_ecr("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com:443"));
        assert!(!is_ecr("ghcr.io"));
        assert!(!is_ecr("dkr.ecr.example.com"));
    }

    #[test]
    fn docker_config_is_found_as_docker_finds_it() {
        assert_eq!(
            Registries::config_path(Some("/etc/deployra-builder/docker"), Some("/root")),
            Some(PathBuf::from("/etc/deployra-builder/docker/config.json"))
        );
        assert_eq!(
            Registries::config_path(None, Some("/var/lib/deployra-builder")),
            Some(PathBuf::from("/var/lib/deployra-builder/.docker/config.json"))
        );
        assert_eq!(Registries::config_path(None, None), None);
    }
}
