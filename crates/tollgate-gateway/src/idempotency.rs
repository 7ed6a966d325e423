//! `Idempotency-Key`: a request executes at most once per (API key,
//! idempotency key) within a TTL. A repeat gets the stored answer, marked
//! `x-tollgate-idempotent-replay: true`, and is not charged again; a
//! duplicate that arrives while the first is running waits for it; the same
//! key with a different body is refused (422).
//!
//! The first execution runs in a task of its own, so a client that hangs up
//! (and will retry) does not cancel the upstream call it already paid for.
//! Only successful answers are kept: after a failure the next attempt runs
//! afresh. A stream is kept once it has run to its end, and replayed as a
//! stream.
//!
//! With Redis configured the records live there, so a retry that reaches
//! another replica finds the first execution all the same; a duplicate
//! waiting on one that runs elsewhere polls the record.

use crate::Gateway;
use crate::error::Error;
use crate::header_names as names;
use crate::pipeline::{self, RequestLog};
use crate::upstream::Endpoint;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tollgate_store::redis::{IdempotencyClaim, RedisIdempotency};

/// Longest idempotency key accepted.
const MAX_KEY_BYTES: usize = 255;

/// A kept answer.
#[derive(Debug)]
struct Stored {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Debug)]
enum Slot {
    /// The first execution is under way; waiters watch for its end.
    Running {
        body_hash: [u8; 32],
        done: watch::Receiver<bool>,
    },
    /// Finished; replayed until `expires`.
    Done {
        body_hash: [u8; 32],
        expires: Instant,
        answer: Arc<Stored>,
    },
}

type SlotKey = (Arc<str>, String);

/// Every idempotency key seen within the TTL: in memory, or in Redis
/// shared by every replica.
#[derive(Debug)]
pub struct IdempotencyStore {
    slots: Mutex<HashMap<SlotKey, Slot>>,
    ttl: Duration,
    shared: Option<Shared>,
}

/// Records in Redis, and how long a claim may run unkept.
#[derive(Debug)]
struct Shared {
    redis: RedisIdempotency,
    claim_for: Duration,
    /// The runtime that built the store, which outlives the threads
    /// serving requests: where a record or release due after its request
    /// runs.
    runtime: tokio::runtime::Handle,
}

/// How often a duplicate looks again at a record running on another
/// replica (Redis cannot wake it).
const POLL_EVERY: Duration = Duration::from_millis(25);

enum Claim {
    /// Run it; the guard keeps the answer (or clears the slot on failure).
    Execute(Guard),
    /// Wait for the running one, then look again.
    Wait(watch::Receiver<bool>),
    /// It runs on another replica: look again shortly.
    Poll,
    /// Answer with this.
    Replay(Arc<Stored>),
    /// Same key, different request.
    Mismatch,
}

/// The right to execute a request, held by its first execution.
struct Guard {
    store: Arc<IdempotencyStore>,
    key: Option<SlotKey>,
    body_hash: [u8; 32],
    done: watch::Sender<bool>,
}

impl Guard {
    fn keep(mut self, answer: Stored) {
        if let Some(key) = self.key.take() {
            if let Some(shared) = &self.store.shared {
                let (redis, ttl, hash) = (shared.redis.clone(), self.store.ttl, self.body_hash);
                let record = encode(&answer);
                shared.runtime.spawn(async move {
                    if let Err(e) = redis.keep(&key.0, &key.1, &hash, &record, ttl).await {
                        tracing::warn!(error = %e, "could not keep an idempotent answer in Redis; a retry will run again");
                    }
                });
                let _ = self.done.send(true);
                return;
            }
            let slot = Slot::Done {
                body_hash: self.body_hash,
                expires: Instant::now() + self.store.ttl,
                answer: Arc::new(answer),
            };
            self.store.lock().insert(key, slot);
        }
        let _ = self.done.send(true);
    }
}

impl Drop for Guard {
    /// Not kept (a failure, a stream cut short): the next attempt runs.
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            match &self.store.shared {
                Some(shared) => {
                    let (redis, hash) = (shared.redis.clone(), self.body_hash);
                    shared.runtime.spawn(async move {
                        // Failing this, the claim lapses on its own.
                        let _ = redis.release(&key.0, &key.1, &hash).await;
                    });
                }
                None => {
                    self.store.lock().remove(&key);
                }
            }
        }
        let _ = self.done.send(true);
    }
}

impl IdempotencyStore {
    /// An empty store in memory keeping answers for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            slots: Mutex::default(),
            ttl,
            shared: None,
        }
    }

    /// Records in Redis, kept for `ttl`; a claim whose replica died lapses
    /// after `claim_for` (the longest a request may run).
    pub fn in_redis(redis: RedisIdempotency, ttl: Duration, claim_for: Duration) -> Self {
        Self {
            slots: Mutex::default(),
            ttl,
            shared: Some(Shared {
                redis,
                claim_for,
                runtime: tokio::runtime::Handle::current(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SlotKey, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops expired answers; returns how many.
    pub fn purge(&self) -> usize {
        let now = Instant::now();
        let mut slots = self.lock();
        let before = slots.len();
        slots.retain(|_, s| !matches!(s, Slot::Done { expires, .. } if *expires <= now));
        before - slots.len()
    }

    async fn claim(self: &Arc<Self>, key: SlotKey, body_hash: [u8; 32]) -> Result<Claim, Error> {
        let Some(shared) = &self.shared else {
            return Ok(self.claim_here(key, body_hash));
        };
        let claimed = shared
            .redis
            .claim(&key.0, &key.1, &body_hash, shared.claim_for)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "idempotency records unavailable");
                Error::IdempotencyUnavailable
            })?;
        Ok(match claimed {
            IdempotencyClaim::Execute => Claim::Execute(Guard {
                store: self.clone(),
                key: Some(key),
                body_hash,
                done: watch::channel(false).0,
            }),
            IdempotencyClaim::Running => Claim::Poll,
            IdempotencyClaim::Mismatch => Claim::Mismatch,
            IdempotencyClaim::Done(record) => match decode(&record) {
                Some(answer) => Claim::Replay(Arc::new(answer)),
                None => {
                    return Err(Error::Internal(
                        "a kept idempotent answer does not decode".into(),
                    ));
                }
            },
        })
    }

    fn claim_here(self: &Arc<Self>, key: SlotKey, body_hash: [u8; 32]) -> Claim {
        let mut slots = self.lock();
        match slots.get(&key) {
            Some(Slot::Done {
                body_hash: h,
                expires,
                answer,
            }) if *expires > Instant::now() => {
                if *h == body_hash {
                    Claim::Replay(answer.clone())
                } else {
                    Claim::Mismatch
                }
            }
            Some(Slot::Running { body_hash: h, done }) => {
                if *h == body_hash {
                    Claim::Wait(done.clone())
                } else {
                    Claim::Mismatch
                }
            }
            _ => {
                let (tx, rx) = watch::channel(false);
                slots.insert(
                    key.clone(),
                    Slot::Running {
                        body_hash,
                        done: rx,
                    },
                );
                Claim::Execute(Guard {
                    store: self.clone(),
                    key: Some(key),
                    body_hash,
                    done: tx,
                })
            }
        }
    }
}

/// Serves a request that carries an `Idempotency-Key`.
pub(crate) async fn proxy(gw: &Arc<Gateway>, endpoint: Endpoint, req: Request) -> Response {
    match serve(gw, endpoint, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn serve(gw: &Arc<Gateway>, endpoint: Endpoint, req: Request) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();
    let caller = gw.keys.authenticate(&parts.headers).await?;
    let idem = parts
        .headers
        .get(&names::IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_BYTES)
        .ok_or(Error::InvalidHeader {
            header: "Idempotency-Key",
            expected: "1 to 255 visible characters",
        })?
        .to_owned();
    let body = pipeline::read_json_body(&parts.headers, body, &gw.config.server).await?;
    let mut hasher = Sha256::new();
    hasher.update(endpoint.path().as_bytes());
    hasher.update([0]);
    hasher.update(&body);
    let body_hash: [u8; 32] = hasher.finalize().into();
    let key = (caller.id.clone(), idem);
    loop {
        match gw.idempotency.claim(key.clone(), body_hash).await? {
            Claim::Replay(answer) => return Ok(replay(&answer, &caller.name)),
            Claim::Mismatch => return Err(Error::IdempotencyKeyReused),
            Claim::Wait(mut done) => {
                let _ = done.wait_for(|finished| *finished).await;
            }
            Claim::Poll => tokio::time::sleep(POLL_EVERY).await,
            Claim::Execute(guard) => {
                let req = Request::from_parts(parts, Body::from(body));
                let gw = gw.clone();
                // Its own task: a client that hangs up does not cancel it.
                let run = tokio::spawn(async move {
                    let resp = pipeline::proxy(&gw, endpoint, req).await;
                    keep(resp, guard).await
                });
                return run
                    .await
                    .map_err(|e| Error::Internal(format!("idempotent request task failed: {e}")));
            }
        }
    }
}

/// Keeps a successful answer: a body at once, a stream when it ends.
async fn keep(resp: Response, guard: Guard) -> Response {
    if !resp.status().is_success() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let streamed = parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
    let mut headers = parts.headers.clone();
    for name in [
        "x-tollgate-cost-usd",
        "x-tollgate-budget-remaining-usd",
        "x-tollgate-credits-remaining-usd",
    ] {
        headers.remove(name);
    }
    let status = parts.status;
    if !streamed {
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return Error::Internal(format!("reading a kept answer: {e}")).into_response();
            }
        };
        guard.keep(Stored {
            status,
            headers,
            body: bytes.clone(),
        });
        return Response::from_parts(parts, Body::from(bytes));
    }
    // Copy the stream as it passes; keep it when it ends whole.
    let mut copy = BytesMut::new();
    let mut guard = Some(guard);
    let mut inner = body.into_data_stream();
    let tee = async_stream(move |tx| async move {
        let mut client_gone = false;
        while let Some(chunk) = inner.next().await {
            match chunk {
                Ok(bytes) => {
                    copy.extend_from_slice(&bytes);
                    // A client that hung up will retry: the stream is read
                    // to its end anyway, so the retry finds it kept.
                    if !client_gone && tx.send(Ok(bytes)).await.is_err() {
                        client_gone = true;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        if let Some(g) = guard.take() {
            g.keep(Stored {
                status,
                headers,
                body: copy.freeze(),
            });
        }
    });
    Response::from_parts(parts, tee)
}

/// A body fed by `produce` through a small channel. The producer runs in
/// its own task, so a stream is read to its end (and kept) even when the
/// client hangs up.
fn async_stream<F, Fut>(produce: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, axum::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(produce(tx));
    Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

fn replay(answer: &Stored, key_name: &Arc<str>) -> Response {
    let mut resp = (answer.status, answer.body.clone()).into_response();
    *resp.headers_mut() = answer.headers.clone();
    resp.headers_mut().insert(
        "x-tollgate-idempotent-replay",
        HeaderValue::from_static("true"),
    );
    resp.extensions_mut().insert(RequestLog {
        key: Some(key_name.clone()),
        decision: crate::metrics::Decision::Replayed,
        ..RequestLog::default()
    });
    resp
}

/// A kept answer as bytes: status (2), header count (2), each header's
/// name and value with 2-byte lengths, then the body.
fn encode(answer: &Stored) -> Vec<u8> {
    let mut out = Vec::with_capacity(answer.body.len() + 512);
    out.extend_from_slice(&answer.status.as_u16().to_be_bytes());
    let headers: Vec<_> = answer
        .headers
        .iter()
        .filter(|(n, v)| n.as_str().len() <= 0xffff && v.len() <= 0xffff)
        .collect();
    out.extend_from_slice(&(headers.len().min(0xffff) as u16).to_be_bytes());
    for (name, value) in headers.into_iter().take(0xffff) {
        for part in [name.as_str().as_bytes(), value.as_bytes()] {
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    out.extend_from_slice(&answer.body);
    out
}

/// The answer [`encode`] wrote; `None` for anything else.
fn decode(bytes: &[u8]) -> Option<Stored> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = b.split_at_checked(n)?;
        *b = rest;
        Some(head)
    }
    fn len(b: &mut &[u8]) -> Option<usize> {
        let v = take(b, 2)?;
        Some(usize::from(u16::from_be_bytes([v[0], v[1]])))
    }
    let mut b = bytes;
    let status = StatusCode::from_u16(len(&mut b)? as u16).ok()?;
    let count = len(&mut b)?;
    let mut headers = HeaderMap::with_capacity(count);
    for _ in 0..count {
        let n = len(&mut b)?;
        let name = http::HeaderName::from_bytes(take(&mut b, n)?).ok()?;
        let n = len(&mut b)?;
        let value = HeaderValue::from_bytes(take(&mut b, n)?).ok()?;
        headers.append(name, value);
    }
    Some(Stored {
        status,
        headers,
        body: Bytes::copy_from_slice(b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_answer_survives_its_bytes() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let answer = Stored {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(b"{\"ok\":true}"),
        };
        let back = decode(&encode(&answer)).expect("decodes");
        assert_eq!(back.status, answer.status);
        assert_eq!(back.headers, answer.headers);
        assert_eq!(back.body, answer.body);
        assert!(
            decode(&encode(&answer)[..5]).is_none(),
            "a cut record is refused"
        );
    }
}
