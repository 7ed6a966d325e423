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

use crate::Gateway;
use crate::error::Error;
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

/// The request header.
pub const HEADER: &str = "idempotency-key";
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

/// Every idempotency key seen within the TTL, in memory.
#[derive(Debug)]
pub struct IdempotencyStore {
    slots: Mutex<HashMap<SlotKey, Slot>>,
    ttl: Duration,
}

enum Claim {
    /// Run it; the guard keeps the answer (or clears the slot on failure).
    Execute(Guard),
    /// Wait for the running one, then look again.
    Wait(watch::Receiver<bool>),
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
            self.store.lock().remove(&key);
        }
        let _ = self.done.send(true);
    }
}

impl IdempotencyStore {
    /// An empty store keeping answers for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            slots: Mutex::default(),
            ttl,
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

    fn claim(self: &Arc<Self>, key: SlotKey, body_hash: [u8; 32]) -> Claim {
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
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_BYTES)
        .ok_or(Error::InvalidHeader {
            header: "Idempotency-Key",
            expected: "1 to 255 visible characters",
        })?
        .to_owned();
    let body =
        pipeline::read_json_body(&parts.headers, body, gw.config.server.max_body_bytes).await?;
    let mut hasher = Sha256::new();
    hasher.update(endpoint.path().as_bytes());
    hasher.update([0]);
    hasher.update(&body);
    let body_hash: [u8; 32] = hasher.finalize().into();
    let key = (caller.id.clone(), idem);
    loop {
        match gw.idempotency.claim(key.clone(), body_hash) {
            Claim::Replay(answer) => return Ok(replay(&answer, &caller.name)),
            Claim::Mismatch => return Err(Error::IdempotencyKeyReused),
            Claim::Wait(mut done) => {
                let _ = done.wait_for(|finished| *finished).await;
            }
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
