//! The HTTP server: routes, the request-id and access-log layer, health
//! checks, and a graceful shutdown that lets in-flight streams finish within
//! the grace period. HTTP/1.1 keep-alive and HTTP/2 (h2c) on one port.

use crate::error::{Error, api_error_response};
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
use std::time::Instant;
use tokio::net::TcpListener;
use tollgate_store::shared::OutagePolicy;
use tracing::Instrument;

/// The id of the request being served (the client's `x-request-id` if it
/// sent a sane one).
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

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

async fn request_id_and_access_log(
    State(gw): State<Arc<Gateway>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get("x-request-id")
        .filter(|v| sane_request_id(v))
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&format!("req_{:032x}", fastrand::u128(..)))
                .unwrap_or(HeaderValue::from_static("req_unknown"))
        });
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    req.extensions_mut().insert(RequestId(id.clone()));
    // The request id alone: key, model and the rest are in the access
    // line, which shares it. Recording more into the span as they become
    // known made the JSON formatter re-parse and re-write the span's fields
    // each time, 14k instructions a request (6 % of the gateway's).
    let span = tracing::info_span!("request", request_id = id.to_str().unwrap_or_default());
    let mut resp = next.run(req).instrument(span).await;
    let proxied = resp.extensions_mut().remove::<RequestLog>();
    let api = proxied.is_some();
    let log = proxied.unwrap_or_default();
    let latency = started.elapsed();
    let status = resp.status().as_u16();
    if api {
        let key = log.key.clone().unwrap_or_else(|| Arc::from("-"));
        metrics::request(
            key,
            metrics::model_label(&gw, log.model.as_ref()),
            status,
            log.decision,
        );
        if let (Some(d), Some(waited)) = (&log.deployment, log.upstream) {
            metrics::upstream(d.clone(), waited);
        }
    }
    tracing::info!(
        target: "tollgate::access",
        request_id = id.to_str().unwrap_or_default(),
        %method,
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
    resp.headers_mut().insert("x-request-id", id);
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

/// Serves until `shutdown` resolves, then lets in-flight requests (streams
/// included) finish for at most the configured grace period.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let grace = gw.config.server.shutdown_grace;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(gw);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = started_tx.send(());
    });
    let server = server.into_future();
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r.map_err(Error::Serve),
        _ = started_rx => {}
    }
    tracing::info!(grace = ?grace, "shutting down: waiting for in-flight requests");
    match tokio::time::timeout(grace, server).await {
        Ok(r) => r.map_err(Error::Serve),
        Err(_) => {
            tracing::warn!("grace period over: closing the remaining connections");
            Ok(())
        }
    }
}
