//! The cancel channel (CONTRACT section 2): every builder hears every
//! cancel. The one running the deployment stops it; all of them record the
//! cancel in Redis, so a deployment still waiting in the queue is not built
//! when some builder reaches it, even after restarts.

use std::time::Duration;

use futures_util::StreamExt;
use redis::Client;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::control::{Running, StopReason};
use crate::queue::Queue;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CancelMessage {
    deployment_id: String,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Listens until `shutdown`, resubscribing after every lost connection.
/// Logs the first failure of an outage and its end, not every retry.
/// `subscribed` fires once the first subscription is in place, so that the
/// builder takes no job before it can hear that job's cancel.
pub async fn listen(
    client: Client,
    channel: String,
    queue: Queue,
    running: Running,
    subscribed: oneshot::Sender<()>,
    shutdown: CancellationToken,
) {
    let mut announce = Some(subscribed);
    let mut backoff = Duration::from_millis(250);
    let mut outage = false;
    loop {
        let subscribed = tokio::select! {
            _ = shutdown.cancelled() => return,
            subscribed = subscribe(&client, &channel) => subscribed,
        };
        match subscribed {
            Ok(pubsub) => {
                if outage {
                    tracing::info!(channel, "cancel subscription restored");
                } else {
                    tracing::debug!(channel, "subscribed to the cancel channel");
                }
                if let Some(announce) = announce.take() {
                    let _ = announce.send(());
                }
                backoff = Duration::from_millis(250);
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        message = messages.next() => message,
                    };
                    let Some(message) = message else { break };
                    match message.get_payload::<String>() {
                        Ok(payload) => on_cancel(&payload, &queue, &running),
                        Err(e) => tracing::warn!(error = %e, "ignored a cancel message that is not text"),
                    }
                }
                tracing::error!(channel, "cancel subscription lost; resubscribing");
                outage = true;
            }
            Err(e) => {
                if !outage {
                    tracing::error!(channel, error = %e, "cannot subscribe to the cancel channel; retrying");
                    outage = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe(client: &Client, channel: &str) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

fn on_cancel(payload: &str, queue: &Queue, running: &Running) {
    let deployment_id = match serde_json::from_str::<CancelMessage>(payload) {
        Ok(message) if !message.deployment_id.is_empty() => message.deployment_id,
        _ => {
            tracing::warn!("ignored a cancel message without a deploymentId");
            return;
        }
    };
    let here = running.stop(&deployment_id, StopReason::Cancelled);
    tracing::info!(deployment_id, running_here = here, "cancel received");
    let mut queue = queue.clone();
    tokio::spawn(async move {
        if let Err(e) = queue.mark_cancelled(&deployment_id).await {
            tracing::error!(deployment_id, error = %e, "could not record the cancel in Redis; a queued copy may still be built");
        }
    });
}
