//! Idempotency records in Redis, so a retry that lands on another replica
//! still finds the first execution: running (wait for it), done (replay
//! it) or absent (run it). The record itself is opaque bytes here.
//!
//! **Placement for Redis Cluster**: a record's hash tag is its API key.

use super::RedisConn;
use crate::Error;
use std::time::Duration;

const IDEMPOTENCY: &str = include_str!("idempotency.lua");

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// Nobody ran it: this caller does, and must keep or release it.
    Execute,
    /// Another execution is under way (on any replica).
    Running,
    /// Done: the kept record.
    Done(Vec<u8>),
    /// The same key was used for another request.
    Mismatch,
}

/// Idempotency records in Redis.
#[derive(Clone)]
pub struct RedisIdempotency {
    conn: RedisConn,
    script: redis::Script,
    prefix: String,
}

impl std::fmt::Debug for RedisIdempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisIdempotency")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisIdempotency {
    pub(crate) fn new(conn: RedisConn, prefix: &str) -> Self {
        Self {
            conn,
            script: redis::Script::new(IDEMPOTENCY),
            prefix: prefix.to_owned(),
        }
    }

    fn key(&self, api_key: &str, idempotency_key: &str) -> String {
        let tag = api_key.replace(['{', '}'], "_");
        format!("{}:{{i:{tag}}}:{idempotency_key}", self.prefix)
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, Error> {
        invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(Error::Redis)
    }

    /// Claims `(api_key, idempotency_key)` for a request whose body hashes
    /// to `body_hash`; a claim lapses after `claim_for` if never kept.
    pub async fn claim(
        &self,
        api_key: &str,
        idempotency_key: &str,
        body_hash: &[u8],
        claim_for: Duration,
    ) -> Result<IdempotencyClaim, Error> {
        let mut call = self.script.prepare_invoke();
        call.key(self.key(api_key, idempotency_key))
            .arg("claim")
            .arg(body_hash)
            .arg(claim_for.as_millis() as u64);
        let reply: Vec<redis::Value> = self.call(call).await?;
        let text = |v: &redis::Value| match v {
            redis::Value::BulkString(b) => Some(b.clone()),
            redis::Value::SimpleString(s) => Some(s.clone().into_bytes()),
            _ => None,
        };
        let first = reply.first().and_then(text).unwrap_or_default();
        Ok(match first.as_slice() {
            b"execute" => IdempotencyClaim::Execute,
            b"running" => IdempotencyClaim::Running,
            b"mismatch" => IdempotencyClaim::Mismatch,
            b"done" => IdempotencyClaim::Done(reply.get(1).and_then(text).unwrap_or_default()),
            _ => {
                return Err(Error::Redis(redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "the idempotency script answered an unexpected shape",
                ))));
            }
        })
    }

    /// Keeps the finished request's `record` for `ttl`.
    pub async fn keep(
        &self,
        api_key: &str,
        idempotency_key: &str,
        body_hash: &[u8],
        record: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        let mut call = self.script.prepare_invoke();
        call.key(self.key(api_key, idempotency_key))
            .arg("keep")
            .arg(body_hash)
            .arg(record)
            .arg(ttl.as_millis() as u64);
        self.call::<i64>(call).await.map(drop)
    }

    /// Gives up a claim that will not be kept (the request failed): the
    /// next attempt runs afresh.
    pub async fn release(
        &self,
        api_key: &str,
        idempotency_key: &str,
        body_hash: &[u8],
    ) -> Result<(), Error> {
        let mut call = self.script.prepare_invoke();
        call.key(self.key(api_key, idempotency_key))
            .arg("release")
            .arg(body_hash);
        self.call::<i64>(call).await.map(drop)
    }
}
