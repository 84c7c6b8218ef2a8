//! The two Engine calls bollard cannot make for a BuildKit session of our
//! own: `/session`, upgraded to the HTTP/2 connection on which the Engine
//! calls the session's services (build secrets, registry credentials), and
//! `/build` naming that session. bollard's own `build_image` always opens
//! a session of its own, which serves registry credentials only.
//!
//! Each call has a connection of its own, closed when the caller drops what
//! it got back: a dropped build closes its request, which makes the Engine
//! stop it.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;

use bollard::errors::Error as DockerError;
use bollard::models::BuildInfo;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::task::AbortOnDrop;

/// Where the Engine listens, read as Docker reads `DOCKER_HOST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineAddress {
    Unix(PathBuf),
    /// `tcp://host:port`, plain HTTP.
    Tcp(String),
}

const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// The longest error body read from the Engine: its messages are one line.
const MAX_ERROR_BODY: usize = 64 * 1024;

impl EngineAddress {
    /// `DOCKER_HOST` (`unix://PATH` or `tcp://HOST:PORT`), or the local
    /// socket when it is unset.
    pub fn from_docker_host(docker_host: Option<&str>) -> Result<EngineAddress, String> {
        match docker_host.map(str::trim).filter(|h| !h.is_empty()) {
            None => Ok(EngineAddress::Unix(PathBuf::from(DEFAULT_SOCKET))),
            Some(host) => {
                if let Some(path) = host.strip_prefix("unix://") {
                    Ok(EngineAddress::Unix(PathBuf::from(path)))
                } else if let Some(addr) = host.strip_prefix("tcp://").or_else(|| host.strip_prefix("http://")) {
                    Ok(EngineAddress::Tcp(addr.trim_end_matches('/').to_owned()))
                } else {
                    Err(format!("{host:?} is not a unix:// or tcp:// address"))
                }
            }
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The task driving a connection: dropping it closes the connection.
pub type Connection = AbortOnDrop<()>;

/// The Engine's API, at the version negotiated with it.
#[derive(Clone, Debug)]
pub struct EngineApi {
    pub address: EngineAddress,
    /// `1.41`: the path prefix of every call.
    pub version: String,
}

impl EngineApi {
    async fn send<B>(&self, request: Request<B>) -> io::Result<(Response<Incoming>, Connection)>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream: Box<dyn Io> = match &self.address {
            EngineAddress::Unix(path) => Box::new(UnixStream::connect(path).await?),
            EngineAddress::Tcp(addr) => Box::new(TcpStream::connect(addr).await?),
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let connection = AbortOnDrop::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        let response = sender.send_request(request).await.map_err(io::Error::other)?;
        Ok((response, connection))
    }

    fn request(&self, path_and_query: &str) -> hyper::http::request::Builder {
        Request::post(format!("/v{}{path_and_query}", self.version)).header("Host", "docker")
    }

    /// Opens a session: the Engine's end of the returned connection speaks
    /// HTTP/2 as the client, calling the `methods` (`/package.Service/Call`)
    /// this side serves.
    pub async fn open_session(
        &self,
        id: &str,
        methods: &[String],
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, DockerError> {
        let mut request = self
            .request("/session")
            .header("Connection", "Upgrade")
            .header("Upgrade", "h2c")
            .header("X-Docker-Expose-Session-Uuid", id)
            .header("X-Docker-Expose-Session-Name", "deployra-builder");
        for method in methods {
            request = request.header("X-Docker-Expose-Session-Grpc-Method", method);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| DockerError::IOError {
                err: io::Error::other(e),
            })?;
        let (response, _connection) = self.send(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(refusal(response).await);
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(|e| DockerError::IOError {
            err: io::Error::other(e),
        })?;
        Ok(TokioIo::new(upgraded))
    }

    /// `POST /build?<query>` with `context` as the body: the build's output,
    /// item by item, as bollard's `build_image` gives it (a failed step is
    /// an error item). Dropping the stream closes the request.
    pub async fn build(
        &self,
        query: &str,
        context: impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
    ) -> Result<impl Stream<Item = Result<BuildInfo, DockerError>>, DockerError> {
        let body = StreamBody::new(context.map(|chunk| chunk.map(Frame::data)));
        let request = self
            .request(&format!("/build?{query}"))
            .header("Content-Type", "application/x-tar")
            .body(body)
            .map_err(|e| DockerError::IOError {
                err: io::Error::other(e),
            })?;
        let (response, connection) = self.send(request).await?;
        if !response.status().is_success() {
            return Err(refusal(response).await);
        }
        let state = Messages {
            frames: BodyStream::new(response.into_body()),
            buffer: Vec::new(),
            scanned: 0,
            ready: VecDeque::new(),
            ended: false,
            _connection: connection,
        };
        Ok(futures_util::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        }))
    }
}

/// `/build`'s output: JSON messages, one a line, in frames of any size.
struct Messages {
    frames: BodyStream<Incoming>,
    buffer: Vec<u8>,
    /// How much of `buffer` holds no newline: only new bytes are scanned.
    scanned: usize,
    ready: VecDeque<Result<BuildInfo, DockerError>>,
    ended: bool,
    _connection: Connection,
}

/// The longest message accepted from `/build`. BuildKit's progress batches
/// many log lines into one message, so this is far above a line's cap.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

impl Messages {
    async fn next(&mut self) -> Option<Result<BuildInfo, DockerError>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            if self.ended {
                return None;
            }
            match self.frames.next().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.take(&data);
                    }
                }
                Some(Err(e)) => {
                    self.ended = true;
                    self.ready.push_back(Err(DockerError::IOError {
                        err: io::Error::other(e),
                    }));
                }
                None => {
                    self.ended = true;
                    let rest = std::mem::take(&mut self.buffer);
                    self.ready.extend(decode(&rest));
                }
            }
        }
    }

    fn take(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
        while let Some(pos) = self.buffer[self.scanned..].iter().position(|&b| b == b'\n') {
            let end = self.scanned + pos;
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            self.scanned = 0;
            self.ready.extend(decode(&line));
        }
        self.scanned = self.buffer.len();
        if self.buffer.len() > MAX_MESSAGE {
            self.ended = true;
            self.ready.push_back(Err(DockerError::IOError {
                err: io::Error::other(format!("the Engine sent a build message of over {MAX_MESSAGE} bytes")),
            }));
        }
    }
}

/// One line of `/build`'s output: a JSON message, or nothing for a blank.
fn decode(line: &[u8]) -> Option<Result<BuildInfo, DockerError>> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(match serde_json::from_slice::<BuildInfo>(line) {
        Ok(info) => match info.error_detail.as_ref().and_then(|d| d.message.clone()) {
            Some(error) => Err(DockerError::DockerStreamError { error }),
            None => Ok(info),
        },
        Err(e) => Err(DockerError::IOError {
            err: io::Error::other(format!("the Engine sent a build message that is not JSON: {e}")),
        }),
    })
}

/// The Engine's answer to a call it would not take: its status and the
/// message of its JSON body, read up to a bound.
async fn refusal(response: Response<Incoming>) -> DockerError {
    let status_code = response.status().as_u16();
    let mut body = Vec::new();
    let mut frames = BodyStream::new(response.into_body());
    while let Some(Ok(frame)) = frames.next().await {
        if let Ok(data) = frame.into_data() {
            body.extend_from_slice(&data[..data.len().min(MAX_ERROR_BODY - body.len())]);
            if body.len() >= MAX_ERROR_BODY {
                break;
            }
        }
    }
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
    DockerError::DockerResponseServerError { status_code, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_is_read_as_docker_reads_it() {
        assert_eq!(
            EngineAddress::from_docker_host(None),
            Ok(EngineAddress::Unix(PathBuf::from("/var/run/docker.sock")))
        );
        assert_eq!(
            EngineAddress::from_docker_host(Some("unix:///run/user/1000/docker.sock")),
            Ok(EngineAddress::Unix(PathBuf::from("/run/user/1000/docker.sock")))
        );
        assert_eq!(
            EngineAddress::from_docker_host(Some("tcp://10.0.0.5:2375")),
            Ok(EngineAddress::Tcp("10.0.0.5:2375".to_owned()))
        );
        assert!(EngineAddress::from_docker_host(Some("ssh://builder@host")).is_err());
    }

    #[test]
    fn build_messages_are_output_failures_or_nothing() {
        let info = decode(br#"{"stream":"Step 1/2 : FROM x\n"}"#).unwrap().unwrap();
        assert_eq!(info.stream.as_deref(), Some("Step 1/2 : FROM x\n"));
        let failed = decode(br#"{"errorDetail":{"message":"exit code: 3"},"error":"exit code: 3"}"#).unwrap();
        assert!(matches!(failed, Err(DockerError::DockerStreamError { error }) if error == "exit code: 3"));
        assert!(decode(b" \r\n").is_none());
        assert!(decode(b"{not json").unwrap().is_err());
    }
}
