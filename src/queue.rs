//! The Redis side of a job's life: taken from the head of the queue into
//! this worker's processing list in one atomic step (BLMOVE), removed from
//! there only once it is settled, and put back at the head of the queue when
//! a restarted worker finds it there. Payloads that are not jobs go to the
//! dead-letter list.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisError};

use crate::config::RedisSettings;

/// How long one BLMOVE blocks; the worker checks for shutdown in between.
const BLOCK: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct QueueNames {
    pub queue: String,
    pub processing: String,
    pub dead: String,
}

impl QueueNames {
    pub fn new(queue: &str, worker_id: &str) -> QueueNames {
        QueueNames {
            queue: queue.to_owned(),
            processing: format!("{queue}:processing:{worker_id}"),
            dead: format!("{queue}:dead"),
        }
    }
}

pub struct Queue {
    client: Client,
    names: QueueNames,
    conn: Option<MultiplexedConnection>,
}

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

impl Queue {
    pub fn new(client: Client, names: QueueNames) -> Queue {
        Queue {
            client,
            names,
            conn: None,
        }
    }

    pub fn names(&self) -> &QueueNames {
        &self.names
    }

    async fn conn(&mut self) -> Result<&mut MultiplexedConnection, RedisError> {
        if self.conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(BLOCK + Duration::from_secs(10)));
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connection was just set"))
    }

    /// Runs a command; a failed connection is dropped so that the next call
    /// reconnects.
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let result = cmd.query_async(self.conn().await?).await;
        if let Err(e) = &result {
            if e.is_connection_dropped() || e.is_io_error() || e.is_timeout() || e.is_unrecoverable_error() {
                self.conn = None;
            }
        }
        result
    }

    /// Waits up to a couple of seconds for a job; `None` when there was none.
    pub async fn take(&mut self) -> Result<Option<String>, RedisError> {
        let mut cmd = redis::cmd("BLMOVE");
        cmd.arg(&self.names.queue)
            .arg(&self.names.processing)
            .arg("LEFT")
            .arg("RIGHT")
            .arg(BLOCK.as_secs());
        self.query(&cmd).await
    }

    /// The job is settled: forget it.
    pub async fn ack(&mut self, raw: &str) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("LREM");
        cmd.arg(&self.names.processing).arg(1).arg(raw);
        self.query::<i64>(&cmd).await.map(drop)
    }

    /// Keeps an unusable payload, with why and when, for a human to look at.
    pub async fn dead_letter(&mut self, raw: &str, reason: &str, worker_id: &str) -> Result<(), RedisError> {
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let entry = serde_json::json!({ "payload": raw, "reason": reason, "at": at, "worker": worker_id });
        let mut cmd = redis::cmd("RPUSH");
        cmd.arg(&self.names.dead).arg(entry.to_string());
        self.query::<i64>(&cmd).await?;
        self.ack(raw).await
    }

    /// Puts back, at the head of the queue and in their original order, the
    /// jobs a previous run of this worker took and never settled.
    pub async fn requeue_unsettled(&mut self) -> Result<u64, RedisError> {
        let mut moved = 0;
        loop {
            let mut cmd = redis::cmd("LMOVE");
            cmd.arg(&self.names.processing)
                .arg(&self.names.queue)
                .arg("RIGHT")
                .arg("LEFT");
            let job: Option<String> = self.query(&cmd).await?;
            if job.is_none() {
                return Ok(moved);
            }
            moved += 1;
        }
    }
}
