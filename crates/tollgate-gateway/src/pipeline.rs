//! A request's life, top to bottom:
//!
//! 1. **auth** — the bearer key, from the in-memory key table (401/403);
//! 2. **read** — content type, size limit, UTF-8, JSON (400/413/415);
//! 3. **route** — the model's deployment (404), the key's model list (403);
//! 4. **admission** — limits, budgets, credits (not yet: later issues);
//! 5. **upstream** — one call to the deployment (502/504 on failure);
//! 6. **relay** — the body as one piece, or the stream chunk by chunk as it
//!    arrives; a client that hangs up drops the upstream call with it.

use crate::Gateway;
use crate::error::{Error, api_error_response, write_retry_advice};
use crate::upstream::{Deployment, Endpoint, Outcome};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Limited};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_core::openai::{ChatRequest, CompletionRequest, EmbeddingRequest, UsageOnly};
use tollgate_core::{ApiError, ErrorType};
use tollgate_store::KeyRecord;

/// What the access log line says about a proxied request.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestLog {
    pub(crate) key: Option<Arc<str>>,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) deployment: Option<Arc<str>>,
    pub(crate) stream: bool,
    /// Time spent waiting on the upstream: until its whole body arrived, or
    /// until its response headers for a stream. The access log subtracts it
    /// from the total to show the gateway's own overhead.
    pub(crate) upstream: Option<Duration>,
}

/// The few fields of a request body that routing needs.
struct Summary {
    model: Arc<str>,
    stream: bool,
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    proxy(&gw, Endpoint::ChatCompletions, req).await
}

/// `POST /v1/completions`.
pub(crate) async fn completions(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    proxy(&gw, Endpoint::Completions, req).await
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    proxy(&gw, Endpoint::Embeddings, req).await
}

async fn proxy(gw: &Gateway, endpoint: Endpoint, req: Request) -> Response {
    let mut log = RequestLog::default();
    let mut resp = match run(gw, endpoint, req, &mut log).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    };
    let h = resp.headers_mut();
    if let Some(v) = log
        .model
        .as_deref()
        .and_then(|m| HeaderValue::from_str(m).ok())
    {
        h.insert("x-tollgate-model", v);
    }
    if let Some(v) = log
        .deployment
        .as_deref()
        .and_then(|d| HeaderValue::from_str(d).ok())
    {
        h.insert("x-tollgate-deployment", v);
        h.insert("x-tollgate-attempts", HeaderValue::from_static("1"));
    }
    resp.extensions_mut().insert(log);
    resp
}

async fn run(
    gw: &Gateway,
    endpoint: Endpoint,
    req: Request,
    log: &mut RequestLog,
) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();

    // 1. auth
    let key = gw.keys.authenticate(&parts.headers).await?;
    log.key = Some(key.name.as_str().into());

    // 2. read
    let body = read_json_body(&parts.headers, body, gw.config.server.max_body_bytes).await?;
    let summary = summarize(endpoint, &body)?;
    log.model = Some(summary.model.clone());
    log.stream = summary.stream;

    // 3. route
    let deployment = route(gw, &key, &summary.model)?;
    log.deployment = Some(deployment.name.clone());

    // 5. upstream
    let passthrough = provider_headers(&parts.headers);
    let sent = Instant::now();
    let outcome = deployment.send(endpoint, body, &passthrough).await?;

    // 6. relay
    let resp = match outcome {
        Outcome::Success(upstream) if summary.stream => {
            log.upstream = Some(sent.elapsed());
            relay_stream(deployment, upstream)
        }
        Outcome::Success(upstream) => {
            let upstream_id = upstream_request_id(&upstream);
            let status = upstream.status();
            let body = upstream
                .bytes()
                .await
                .map_err(|e| deployment.transport_error(e))?;
            log.upstream = Some(sent.elapsed());
            relay_body(deployment, status, upstream_id, body)?
        }
        Outcome::CallerError {
            status,
            content_type,
            body,
        } => {
            let mut resp = (status, body).into_response();
            if let Some(ct) = content_type {
                resp.headers_mut().insert(CONTENT_TYPE, ct);
            }
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
            resp
        }
        Outcome::Throttled {
            body,
            retry_after,
            quota_exhausted,
        } => {
            let mut resp = (StatusCode::TOO_MANY_REQUESTS, body).into_response();
            // insufficient_quota is billing: it never clears with time.
            write_retry_advice(resp.headers_mut(), !quota_exhausted, retry_after);
            resp
        }
    };
    Ok(resp)
}

/// Reads the body under the size limit and checks it is UTF-8 JSON text.
async fn read_json_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Error> {
    if let Some(ct) = headers.get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("(not text)");
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(Error::UnsupportedMediaType(ct.chars().take(100).collect()));
        }
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Error::BodyTooLarge { limit });
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Error::BodyTooLarge { limit });
        }
        Err(e) => return Err(Error::BodyRead(e.to_string())),
    };
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(Error::InvalidUtf8(e.valid_up_to()));
    }
    Ok(bytes)
}

fn json_error(e: serde_json::Error) -> Error {
    match e.classify() {
        serde_json::error::Category::Data => Error::InvalidField(e),
        _ => Error::InvalidJson(e),
    }
}

/// Reads the model and stream flag, checking the endpoint's required fields.
fn summarize(endpoint: Endpoint, body: &[u8]) -> Result<Summary, Error> {
    let (model, stream) = match endpoint {
        Endpoint::ChatCompletions => {
            let r: ChatRequest<'_> = serde_json::from_slice(body).map_err(json_error)?;
            if r.messages.is_none() {
                return Err(Error::MissingField("messages"));
            }
            (r.model.as_deref().map(Arc::<str>::from), r.is_stream())
        }
        Endpoint::Completions => {
            let r: CompletionRequest<'_> = serde_json::from_slice(body).map_err(json_error)?;
            if r.prompt.is_none() {
                return Err(Error::MissingField("prompt"));
            }
            (
                r.model.as_deref().map(Arc::<str>::from),
                r.stream.unwrap_or(false),
            )
        }
        Endpoint::Embeddings => {
            let r: EmbeddingRequest<'_> = serde_json::from_slice(body).map_err(json_error)?;
            if r.input.is_none() {
                return Err(Error::MissingField("input"));
            }
            (r.model.as_deref().map(Arc::<str>::from), false)
        }
    };
    let model = model
        .filter(|m| !m.is_empty())
        .ok_or(Error::MissingField("model"))?;
    Ok(Summary { model, stream })
}

fn route<'g>(gw: &'g Gateway, key: &KeyRecord, model: &str) -> Result<&'g Arc<Deployment>, Error> {
    let deployment = gw
        .routes
        .get(model)
        .ok_or_else(|| Error::ModelNotFound(model.to_owned()))?;
    if !key.allows_model(model) {
        return Err(Error::ModelNotAllowed {
            key: key.name.clone(),
            model: model.to_owned(),
        });
    }
    Ok(deployment)
}

/// Client headers addressed to the provider itself: `x-mock-*`, which only
/// the simulated provider reads (fault injection in tests).
fn provider_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if name.as_str().starts_with("x-mock-") {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn upstream_request_id(upstream: &reqwest::Response) -> Option<HeaderValue> {
    upstream.headers().get("x-request-id").cloned()
}

fn relay_body(
    deployment: &Deployment,
    status: StatusCode,
    upstream_id: Option<HeaderValue>,
    body: Bytes,
) -> Result<Response, Error> {
    // Parsing the usage also proves the body is whole, well-formed JSON.
    if let Err(e) = serde_json::from_slice::<UsageOnly>(&body) {
        return Err(Error::UpstreamInvalid {
            deployment: deployment.name.to_string(),
            detail: format!("body is not valid JSON: {e}"),
        });
    }
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(id) = upstream_id {
        h.insert("x-upstream-request-id", id);
    }
    Ok(resp)
}

/// The SSE event that ends a stream the upstream broke off; the OpenAI SDKs
/// raise an `APIError` when they read it.
fn stream_error_event(e: &ApiError) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    let _ = serde_json::to_writer(&mut out, &e.to_body());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn relay_stream(deployment: &Arc<Deployment>, upstream: reqwest::Response) -> Response {
    let upstream_id = upstream_request_id(&upstream);
    let deployment = deployment.clone();
    let chunks = upstream.bytes_stream();
    let body = stream::unfold(Some(chunks), move |state| {
        let deployment = deployment.clone();
        async move {
            let mut chunks = state?;
            match chunks.next().await {
                Some(Ok(bytes)) => Some((Ok::<_, Infallible>(bytes), Some(chunks))),
                Some(Err(e)) => {
                    let err = deployment.transport_error(e);
                    tracing::warn!(deployment = %deployment.name, error = %err, "upstream stream broke off");
                    let api = ApiError::new(
                        502,
                        ErrorType::Upstream,
                        "upstream_stream_interrupted",
                        format!(
                            "The upstream deployment '{}' broke off the stream.",
                            deployment.name
                        ),
                    );
                    Some((Ok(stream_error_event(&api)), None))
                }
                None => None,
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    if let Some(id) = upstream_id {
        h.insert("x-upstream-request-id", id);
    }
    resp
}

/// `GET /v1/models`: the models this key may use.
pub(crate) async fn list_models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let key = match gw.keys.authenticate(&headers).await {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let data: Vec<serde_json::Value> = gw
        .model_names
        .iter()
        .filter(|m| key.allows_model(m))
        .map(|m| model_object(m))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{model}`.
pub(crate) async fn get_model(
    State(gw): State<Arc<Gateway>>,
    axum::extract::Path(model): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let key = match gw.keys.authenticate(&headers).await {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    match route(&gw, &key, &model) {
        Ok(_) => axum::Json(model_object(&model)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn model_object(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "tollgate"})
}

/// Any other URL.
pub(crate) async fn unknown_url(method: http::Method, uri: http::Uri) -> Response {
    api_error_response(
        &Error::UnknownUrl {
            method: method.to_string(),
            path: uri.path().chars().take(200).collect(),
        }
        .to_api_error(),
    )
}
