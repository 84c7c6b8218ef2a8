//! The operator's HTTP endpoints on `METRICS_ADDR`: `GET /metrics` for
//! Prometheus and `GET /healthz` for monitors and people with curl.
//!
//! Neither may hang a scrape or a probe behind an unreachable Redis or
//! Docker Engine: every look at them has a short timeout, and a slow answer
//! counts as a failed one.

use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::image::docker::Engine;
use crate::metrics::{self, Metrics};
use crate::queue::Queue;

/// How long `/healthz` waits for each of Redis and Docker.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a scrape waits for the queue's length before it shows the last
/// one it got.
const QUEUE_LENGTH_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections still open at shutdown get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoints look at; cheap to clone.
#[derive(Clone)]
pub struct Endpoints {
    metrics: Metrics,
    docker: Engine,
    /// Empty until Redis first answers: the endpoints serve from before
    /// that, so that a builder waiting for Redis at start says so.
    queue: Arc<OnceLock<Queue>>,
}

impl Endpoints {
    pub fn new(metrics: Metrics, docker: Engine) -> Endpoints {
        Endpoints {
            metrics,
            docker,
            queue: Arc::default(),
        }
    }

    /// From now on Redis is checked through `queue`.
    pub fn redis_connected(&self, queue: Queue) {
        let _ = self.queue.set(queue);
    }
}

/// Answers on `listener` until `stop` fires, then gives open connections a
/// moment to finish. The caller binds the listener, so that an address in
/// use stops the daemon before it waits for anything.
pub async fn serve(listener: TcpListener, endpoints: Endpoints, stop: CancellationToken) {
    let connections = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "METRICS_ADDR: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let endpoints = endpoints.clone();
        let service = service_fn(move |req| {
            let endpoints = endpoints.clone();
            async move { Ok::<_, Infallible>(respond(&endpoints, &req).await) }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("metrics connections still open at shutdown were dropped");
    }
}

async fn respond(endpoints: &Endpoints, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            refresh_queue_length(endpoints).await;
            reply(StatusCode::OK, metrics::CONTENT_TYPE, endpoints.metrics.encode())
        }
        (&Method::GET, "/healthz") => health(endpoints).await,
        (_, "/metrics" | "/healthz") => {
            let mut response = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "GET only\n",
            );
            response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET"));
            response
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; try /metrics or /healthz\n",
        ),
    }
}

async fn refresh_queue_length(endpoints: &Endpoints) {
    let Some(mut queue) = endpoints.queue.get().cloned() else {
        return;
    };
    match tokio::time::timeout(QUEUE_LENGTH_TIMEOUT, queue.length()).await {
        Ok(Ok(jobs)) => endpoints.metrics.set_queue_length(jobs),
        Ok(Err(e)) => tracing::debug!(error = %e, "queue length unknown for this scrape"),
        Err(_) => tracing::debug!("queue length unknown for this scrape: Redis is slow"),
    }
}

/// 200 when both Redis and the Docker Engine answer, 503 otherwise; the
/// body says which one failed and why.
async fn health(endpoints: &Endpoints) -> Response<Full<Bytes>> {
    let redis = async {
        match endpoints.queue.get().cloned() {
            Some(mut queue) => probe(queue.ping()).await,
            None => Err("not connected yet".to_owned()),
        }
    };
    let (redis, docker) = tokio::join!(redis, probe(endpoints.docker.ping()));
    let healthy = redis.is_ok() && docker.is_ok();
    let verdict = |r: Result<(), String>| r.map_or_else(|e| format!("failed: {e}"), |()| "ok".to_owned());
    let body = Health {
        status: if healthy { "ok" } else { "unavailable" },
        redis: verdict(redis),
        docker: verdict(docker),
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let json = serde_json::to_string(&body).expect("the health body is plain strings");
    reply(status, "application/json", format!("{json}\n"))
}

/// `/healthz`'s body; a struct, so that `status` reads first.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    redis: String,
    docker: String,
}

async fn probe<E: Display>(check: impl Future<Output = Result<(), E>>) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
