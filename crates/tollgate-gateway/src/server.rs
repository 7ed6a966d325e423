//! The HTTP server: routes, the request-id and access-log layer, health
//! checks, and a graceful shutdown that lets in-flight streams finish within
//! the grace period. HTTP/1.1 keep-alive and HTTP/2 (h2c) on one port.

use crate::error::{Error, api_error_response};
use crate::header_names as names;
use crate::pipeline::{self, RequestLog};
use crate::{Gateway, admin, dashboard, metrics};
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use http::HeaderValue;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::net::TcpListener;
use tollgate_store::shared::OutagePolicy;

tokio::task_local! {
    /// The id of the API request the task is serving (the client's
    /// `x-request-id` if it sent a sane one).
    static SERVING: HeaderValue;
}

/// The id of the API request the calling task is serving, if it serves
/// one: its usage row's, and a `request` span's on the lines logged meanwhile.
///
/// A task-local value rather than a real span: creating, entering and
/// closing a span a request cost 5.7k instructions (5 % of a request),
/// mostly in tracing-subscriber's registry, for the warnings of the few
/// requests that log any.
pub fn serving_request() -> Option<HeaderValue> {
    SERVING.try_with(HeaderValue::clone).ok()
}

/// Runs `f` as the task serving request `id` (for tests of the log formats).
pub fn as_serving<R>(id: HeaderValue, f: impl FnOnce() -> R) -> R {
    SERVING.sync_scope(id, f)
}

/// The gateway's routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    let method_not_allowed =
        || async { api_error_response(&Error::MethodNotAllowed("this".into()).to_api_error()) };
    Router::new()
        .route(
            "/v1/chat/completions",
            post(pipeline::chat_completions).fallback(method_not_allowed),
        )
        .route(
            "/v1/completions",
            post(pipeline::completions).fallback(method_not_allowed),
        )
        .route(
            "/v1/embeddings",
            post(pipeline::embeddings).fallback(method_not_allowed),
        )
        .route("/v1/models", get(pipeline::list_models))
        .route("/v1/models/{model}", get(pipeline::get_model))
        .route("/admin/keys", post(admin::create_key).get(admin::list_keys))
        .route("/admin/keys/{id}", patch(admin::update_key))
        .route("/admin/keys/{id}/revoke", post(admin::revoke_key))
        .route("/admin/keys/{id}/rotate", post(admin::rotate_key))
        .route(
            "/admin/budgets",
            get(admin::list_budgets)
                .put(admin::set_budget)
                .delete(admin::remove_budget),
        )
        .route(
            "/admin/credits/{account}",
            get(admin::show_credits).post(admin::add_credits),
        )
        .route("/admin/usage", get(admin::usage))
        .route("/admin/deployments", get(admin::deployments))
        .route("/metrics", get(metrics_text))
        .route("/ui", get(dashboard::index))
        .route("/ui/app.js", get(dashboard::app_js))
        .route("/ui/style.css", get(dashboard::style_css))
        .route("/ui/login", post(dashboard::login))
        .route("/ui/logout", post(dashboard::logout))
        .route("/ui/api/summary", get(dashboard::summary))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(pipeline::unknown_url)
        .layer(middleware::from_fn_with_state(
            gw.clone(),
            request_id_and_access_log,
        ))
        .with_state(gw)
}

fn sane_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// A fresh request id, `req_` and 128 random bits in hex.
fn new_request_id() -> HeaderValue {
    HeaderValue::from_bytes(&request_id_text(fastrand::u128(..)))
        .unwrap_or(HeaderValue::from_static("req_unknown"))
}

/// `req_{bits:032x}`, written by hand: `format!` went through the
/// formatter's padding and a `String` on every request without an id.
fn request_id_text(bits: u128) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"req_00000000000000000000000000000000";
    for (i, c) in id[4..].iter_mut().enumerate() {
        *c = HEX[(bits >> (124 - 4 * i) & 0xf) as usize];
    }
    id
}

async fn request_id_and_access_log(
    State(gw): State<Arc<Gateway>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get(&names::REQUEST_ID)
        .filter(|v| sane_request_id(v))
        .cloned()
        .unwrap_or_else(new_request_id);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // The request id alone: key, model and the rest are in the access
    // line, which shares it.
    let mut resp = SERVING.scope(id.clone(), next.run(req)).await;
    let proxied = resp.extensions_mut().remove::<RequestLog>();
    let api = proxied.is_some();
    let log = proxied.unwrap_or_default();
    let latency = started.elapsed();
    let status = resp.status().as_u16();
    if api {
        metrics::request(
            log.key.as_ref().unwrap_or_else(|| metrics::no_key()),
            metrics::model_label(&gw, log.model.as_ref()),
            status,
            log.decision,
        );
        if let (Some(d), Some(waited)) = (&log.deployment, log.upstream) {
            metrics::upstream(d, waited);
        }
    }
    tracing::info!(
        target: "tollgate::access",
        request_id = id.to_str().unwrap_or_default(),
        method = method.as_str(),
        path,
        status,
        key = log.key.as_deref(),
        model = log.model.as_deref(),
        decision = api.then_some(log.decision.as_str()),
        deployment = log.deployment.as_deref(),
        attempts = api.then_some(log.attempts),
        fallback = log.fallback.as_deref(),
        stream = log.stream,
        estimate = log.estimate,
        queued_ms = log.queued.map(|q| q.as_millis() as u64),
        latency_us = latency.as_micros() as u64,
        upstream_us = log.upstream.map(|u| u.as_micros() as u64),
        overhead_us = log.upstream.map(|u| latency.saturating_sub(u).as_micros() as u64),
        "request"
    );
    resp.headers_mut().insert(names::REQUEST_ID.clone(), id);
    resp
}

async fn metrics_text(State(gw): State<Arc<Gateway>>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        metrics::render(&gw),
    )
        .into_response()
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let database = gw.db.ping().await;
    if let Err(e) = &database {
        tracing::warn!(error = %e, "readiness check: database not answering");
    }
    let (backend, limits_ok) = gw.limits.check_store().await;
    if !limits_ok {
        tracing::warn!(backend, "readiness check: limit state not answering");
    }
    let mut limits = serde_json::json!({
        "store": backend,
        "state": if limits_ok { "ok" } else { "unavailable" },
    });
    // Failing open, a replica without Redis still serves (alone, with its
    // share of each limit): it stays ready, and says how it decides.
    let mut serving = limits_ok;
    if let Some(shared) = gw.limits.shared() {
        let health = shared.health();
        let policy = shared.policy();
        limits["on_redis_outage"] = policy.as_str().into();
        limits["live_replicas"] = health.live_replicas().into();
        limits["conservative_refill"] = health.draining().into();
        if !limits_ok && policy == OutagePolicy::FailOpen {
            limits["state"] = "fallback".into();
            serving = true;
        }
    }
    let ready = database.is_ok() && serving;
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "database": if database.is_ok() { "ok" } else { "unavailable" },
        "limits": limits,
    });
    let status = if ready {
        http::StatusCode::OK
    } else {
        http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

thread_local! {
    /// Which serving thread this is (1-based); 0 on every other thread.
    static SERVING_THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Which serving thread runs the caller (1-based), 0 when none does: the
/// index of the upstream connection pool a request uses, so that a request
/// and its upstream connection are driven by one thread.
pub fn serving_thread() -> usize {
    SERVING_THREAD.with(std::cell::Cell::get)
}

/// Serves until `shutdown` resolves, then lets in-flight requests (streams
/// included) finish for at most the configured grace period.
///
/// Connections are served on `server.threads` threads, each a single-
/// threaded runtime that drives a connection from accept to close together
/// with the upstream connections its requests use. On tokio's shared
/// multi-threaded runtime a request hopped between workers (its connection,
/// the handler, the upstream connection's task), each hop a futex wake and
/// a context switch: a quarter of the gateway's CPU per request on two cores.
/// One acceptor hands each connection to the thread with the fewest open
/// (Envoy's exact balance): racing accepts on every thread left 30 of 32
/// connections on one of two.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let grace = gw.config.server.shutdown_grace;
    let read_timeout = gw.config.server.read_timeout;
    let mut threads = Vec::new();
    for index in 1..=gw.serving_threads() {
        threads.push(ServingThread::start(
            index,
            router(gw.clone()),
            grace,
            read_timeout,
        )?);
    }
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: it passes.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let least_busy = threads
            .iter()
            .min_by_key(|t| t.open.load(Ordering::Relaxed))
            .ok_or_else(|| Error::Internal("no serving thread".into()))?;
        // A connection that cannot be handed over is dropped: its client reconnects.
        if let Ok(stream) = stream.into_std() {
            least_busy.open.fetch_add(1, Ordering::Relaxed);
            let _ = least_busy.connections.send(stream);
        }
    }
    drop(listener);
    tracing::info!(grace = ?grace, "shutting down: waiting for in-flight requests");
    // Every thread is told at once, so that they drain side by side.
    let finished: Vec<_> = threads.into_iter().map(|t| t.finished).collect();
    let mut result = Ok(());
    for done in finished {
        if done.await.is_err() {
            result = Err(Error::Internal("a serving thread panicked".into()));
        }
    }
    result
}

/// A thread serving the connections handed to it.
struct ServingThread {
    /// Accepted connections for it; closed to make it stop.
    connections: tokio::sync::mpsc::UnboundedSender<std::net::TcpStream>,
    /// Its open connections.
    open: Arc<AtomicUsize>,
    /// Resolves when its connections are done.
    finished: tokio::sync::oneshot::Receiver<()>,
}

impl ServingThread {
    fn start(
        index: usize,
        app: Router,
        grace: std::time::Duration,
        read_timeout: std::time::Duration,
    ) -> Result<Self, Error> {
        let (connections, incoming) = tokio::sync::mpsc::unbounded_channel();
        let open = Arc::new(AtomicUsize::new(0));
        let (done, finished) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Serve)?;
        let counted = open.clone();
        std::thread::Builder::new()
            .name(format!("tollgate-serve-{index}"))
            .spawn(move || {
                SERVING_THREAD.with(|t| t.set(index));
                runtime.block_on(serve_connections(
                    incoming,
                    counted,
                    app,
                    grace,
                    read_timeout,
                ));
                let _ = done.send(());
                // The thread stays, parked: database and Redis connections
                // its requests opened are registered with its runtime and
                // must stay usable by the rest of the process.
                runtime.block_on(std::future::pending::<()>());
            })
            .map_err(Error::Serve)?;
        Ok(Self {
            connections,
            open,
            finished,
        })
    }
}

/// Serves each connection handed over until the sender closes, then lets
/// them finish for at most `grace` and closes the rest. An HTTP/1
/// connection whose client takes longer than `read_timeout` to send a
/// request's headers (or the next request's) is closed.
async fn serve_connections(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
    app: Router,
    grace: std::time::Duration,
    read_timeout: std::time::Duration,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let (close, closed) = tokio::sync::watch::channel(false);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    while let Some(stream) = incoming.recv().await {
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                open.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "could not take over a connection");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let (open, mut closed) = (open.clone(), closed.clone());
        tokio::spawn(async move {
            // A client that hangs up or sends garbage ends its connection.
            tokio::select! {
                _ = conn => {}
                _ = closed.wait_for(|closed| *closed) => {}
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(app);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over: closing the remaining connections");
        let _ = close.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same text `format!("req_{:032x}")` writes, leading zeros and
    /// every nibble's place included.
    #[test]
    fn request_ids_are_req_and_32_hex_digits() {
        for bits in [
            0,
            1,
            0xf << 124,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            assert_eq!(request_id_text(bits), format!("req_{bits:032x}").as_bytes());
        }
        for _ in 0..1000 {
            let bits = fastrand::u128(..);
            assert_eq!(request_id_text(bits), format!("req_{bits:032x}").as_bytes());
        }
    }
}
