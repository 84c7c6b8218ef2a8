//! Everything the builders keep in Redis, and the operations on it.
//!
//! A job's life in Redis:
//! - it waits in `<queue>` and is taken from the head (where BLPOP pops)
//!   by BLMOVE into `<queue>:processing:<worker>`, atomically, so it is
//!   never only in a builder's memory;
//! - while it runs, `<queue>:running:<deploymentId>` names the builder that
//!   owns it, so a duplicate of it is not built at the same time;
//! - once its final status is delivered it leaves the processing list;
//!   `<queue>:done:<deploymentId>` then remembers for a day that it was
//!   BUILDED or CANCELLED, so a duplicate is not built again;
//! - if its builder dies, the job stays in that builder's processing list;
//!   the builder's heartbeat `<queue>:worker:<worker>` expires, and any
//!   builder puts the job back at the head of the queue;
//!   `<queue>:attempts:<deploymentId>` counts how often that happened.
//!
//! `<queue>:cancelled:<deploymentId>` marks a deployment cancelled by the
//! dashboard, for every builder, for a day; `<queue>:dead` keeps payloads
//! that are not jobs at all.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisError};

use crate::config::RedisSettings;

/// How long one BLMOVE blocks; the worker checks for shutdown in between.
const BLOCK: Duration = Duration::from_secs(2);
/// A builder whose heartbeat is older than this is gone.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(30);
/// How long cancel and done markers are kept.
const MARKER_TTL: Duration = Duration::from_secs(24 * 3600);

pub fn client(settings: &RedisSettings) -> Result<Client, RedisError> {
    let mut redis = RedisConnectionInfo::default();
    if let Some(user) = &settings.username {
        redis = redis.set_username(user);
    }
    if let Some(password) = &settings.password {
        redis = redis.set_password(password.expose());
    }
    let info = ConnectionAddr::Tcp(settings.host.clone(), settings.port)
        .into_connection_info()?
        .set_redis_settings(redis);
    Client::open(info)
}

#[derive(Clone, Debug)]
pub struct Keys {
    pub queue: String,
    pub dead: String,
}

impl Keys {
    pub fn new(queue: &str) -> Keys {
        Keys {
            queue: queue.to_owned(),
            dead: format!("{queue}:dead"),
        }
    }

    pub fn processing(&self, worker: &str) -> String {
        format!("{}:processing:{worker}", self.queue)
    }

    fn heartbeat(&self, worker: &str) -> String {
        format!("{}:worker:{worker}", self.queue)
    }

    fn marker(&self, kind: &str, deployment_id: &str) -> String {
        format!("{}:{kind}:{deployment_id}", self.queue)
    }
}

/// Who holds a deployment's running lock.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    Acquired,
    HeldBy(String),
}

/// The Redis side of one builder. Cheap to clone; reconnects by itself.
#[derive(Clone)]
pub struct Queue {
    keys: Keys,
    worker_id: String,
    processing: String,
    /// Only for BLMOVE, whose answer may take [`BLOCK`].
    blocking: ConnectionManager,
    conn: ConnectionManager,
}

impl Queue {
    /// Connects; fails when Redis cannot be reached now (the caller retries).
    pub async fn connect(client: &Client, keys: Keys, worker_id: &str) -> Result<Queue, RedisError> {
        let config = |response_timeout| {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(response_timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(2))
        };
        let blocking =
            ConnectionManager::new_with_config(client.clone(), config(BLOCK + Duration::from_secs(10))).await?;
        let conn = ConnectionManager::new_with_config(client.clone(), config(Duration::from_secs(10))).await?;
        Ok(Queue {
            processing: keys.processing(worker_id),
            keys,
            worker_id: worker_id.to_owned(),
            blocking,
            conn,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Through the connection every job's bookkeeping uses, so a health
    /// check sees what the worker sees.
    pub async fn ping(&mut self) -> Result<(), RedisError> {
        redis::cmd("PING").query_async::<String>(&mut self.conn).await.map(drop)
    }

    /// How many jobs wait in the queue.
    pub async fn length(&mut self) -> Result<u64, RedisError> {
        self.conn.llen(&self.keys.queue).await
    }

    /// Waits up to a couple of seconds for a job; `None` when there was none.
    /// Bytes, not text: an entry that is not UTF-8 must still be taken,
    /// to be dead-lettered, rather than fail every take after it.
    pub async fn take(&mut self) -> Result<Option<Vec<u8>>, RedisError> {
        redis::cmd("BLMOVE")
            .arg(&self.keys.queue)
            .arg(&self.processing)
            .arg("LEFT")
            .arg("RIGHT")
            .arg(BLOCK.as_secs())
            .query_async(&mut self.blocking)
            .await
    }

    /// The job is settled: forget it.
    pub async fn ack(&mut self, raw: &str) -> Result<(), RedisError> {
        self.conn.lrem::<_, _, i64>(&self.processing, 1, raw).await.map(drop)
    }

    /// Puts a job this builder holds back at the head of the queue.
    pub async fn requeue(&mut self, raw: &str) -> Result<(), RedisError> {
        redis::pipe()
            .atomic()
            .lrem(&self.processing, 1, raw)
            .ignore()
            .lpush(&self.keys.queue, raw)
            .ignore()
            .query_async(&mut self.conn)
            .await
    }

    /// Keeps an unusable payload, with why and when, for a human to look at
    /// (bytes that are not UTF-8 are kept with U+FFFD in their place).
    pub async fn dead_letter(&mut self, raw: &[u8], reason: &str) -> Result<(), RedisError> {
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let payload = String::from_utf8_lossy(raw);
        let entry = serde_json::json!({ "payload": payload, "reason": reason, "at": at, "worker": self.worker_id });
        redis::pipe()
            .atomic()
            .rpush(&self.keys.dead, entry.to_string())
            .ignore()
            .lrem(&self.processing, 1, raw)
            .ignore()
            .query_async(&mut self.conn)
            .await
    }

    pub async fn heartbeat(&mut self) -> Result<(), RedisError> {
        self.conn
            .set_ex(self.keys.heartbeat(&self.worker_id), 1, HEARTBEAT_TTL.as_secs())
            .await
    }

    /// Stops announcing this builder, so its lists are recovered at once.
    pub async fn retire(&mut self) -> Result<(), RedisError> {
        self.conn.del(self.keys.heartbeat(&self.worker_id)).await
    }

    /// Puts back at the head of the queue, in their order, the jobs of
    /// builders that are gone, and this builder's own jobs from a previous
    /// run when `include_own`. Returns how many moved.
    pub async fn recover(&mut self, include_own: bool) -> Result<u64, RedisError> {
        let pattern = format!("{}:processing:*", self.keys.queue);
        let lists: Vec<String> = {
            let mut iter = self.conn.scan_match::<_, String>(&pattern).await?;
            let mut lists = Vec::new();
            while let Some(key) = futures_util::StreamExt::next(&mut iter).await {
                lists.push(key?);
            }
            lists
        };
        let prefix = format!("{}:processing:", self.keys.queue);
        let mut moved = 0;
        for list in lists {
            let Some(worker) = list.strip_prefix(&prefix) else {
                continue;
            };
            let own = worker == self.worker_id;
            if own && !include_own {
                continue;
            }
            if !own && self.conn.exists::<_, bool>(self.keys.heartbeat(worker)).await? {
                continue;
            }
            loop {
                let job: Option<Vec<u8>> = self
                    .conn
                    .lmove(&list, &self.keys.queue, redis::Direction::Right, redis::Direction::Left)
                    .await?;
                if job.is_none() {
                    break;
                }
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Takes the deployment's running lock, or tells who has it. A lock
    /// left by a builder that is gone is taken over, and so is one held in
    /// this builder's name: the caller has made sure the deployment does not
    /// run here, so that lock is left over from before a restart.
    pub async fn claim(&mut self, deployment_id: &str, ttl: Duration) -> Result<Claim, RedisError> {
        let key = self.keys.marker("running", deployment_id);
        let options = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::EX(ttl.as_secs()));
        let set: Option<String> = self.conn.set_options(&key, &self.worker_id, options).await?;
        if set.is_some() {
            return Ok(Claim::Acquired);
        }
        let owner: Option<String> = self.conn.get(&key).await?;
        let owner_alive = match &owner {
            Some(owner) if *owner != self.worker_id => self.conn.exists::<_, bool>(self.keys.heartbeat(owner)).await?,
            _ => false,
        };
        if owner_alive {
            return Ok(Claim::HeldBy(owner.unwrap_or_default()));
        }
        self.conn
            .set_ex::<_, _, ()>(&key, &self.worker_id, ttl.as_secs())
            .await?;
        Ok(Claim::Acquired)
    }

    pub async fn release(&mut self, deployment_id: &str) -> Result<(), RedisError> {
        self.conn.del(self.keys.marker("running", deployment_id)).await
    }

    /// Counts one more start of this deployment; returns the count.
    pub async fn count_attempt(&mut self, deployment_id: &str) -> Result<u64, RedisError> {
        let key = self.keys.marker("attempts", deployment_id);
        let (count,): (u64,) = redis::pipe()
            .atomic()
            .incr(&key, 1)
            .expire(&key, MARKER_TTL.as_secs() as i64)
            .ignore()
            .query_async(&mut self.conn)
            .await?;
        Ok(count)
    }

    /// An interruption that was not a crash (a graceful shutdown) does not
    /// count against the job.
    pub async fn uncount_attempt(&mut self, deployment_id: &str) -> Result<(), RedisError> {
        self.conn.decr(self.keys.marker("attempts", deployment_id), 1).await
    }

    pub async fn mark_cancelled(&mut self, deployment_id: &str) -> Result<(), RedisError> {
        self.conn
            .set_ex(self.keys.marker("cancelled", deployment_id), 1, MARKER_TTL.as_secs())
            .await
    }

    pub async fn is_cancelled(&mut self, deployment_id: &str) -> Result<bool, RedisError> {
        self.conn.exists(self.keys.marker("cancelled", deployment_id)).await
    }

    /// Remembers that the deployment reached a final status no duplicate
    /// should repeat, and forgets its attempts.
    pub async fn mark_done(&mut self, deployment_id: &str) -> Result<(), RedisError> {
        redis::pipe()
            .atomic()
            .set_ex(self.keys.marker("done", deployment_id), 1, MARKER_TTL.as_secs())
            .ignore()
            .del(self.keys.marker("attempts", deployment_id))
            .ignore()
            .query_async(&mut self.conn)
            .await
    }

    pub async fn is_done(&mut self, deployment_id: &str) -> Result<bool, RedisError> {
        self.conn.exists(self.keys.marker("done", deployment_id)).await
    }

    pub async fn forget_attempts(&mut self, deployment_id: &str) -> Result<(), RedisError> {
        self.conn.del(self.keys.marker("attempts", deployment_id)).await
    }
}
