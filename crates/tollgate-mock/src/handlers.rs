//! The OpenAI endpoints the mock answers, and the bodies it answers with.

// An `Err` here is the whole HTTP answer, built once per refused request;
// boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use crate::config::MockConfig;
use crate::fault::{FAULT_HEADER, Fault};
use crate::limits::{Dimension, LimitRefusal, LimitStatus, ProviderLimits};
use crate::server::ConnectionKiller;
use crate::stats::{Event, MockStats};
use crate::text;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tollgate_core::duration::format_reset;
use tollgate_core::openai::{ChatRequest, CompletionRequest, EmbeddingRequest};
use tollgate_core::tokens::{Encoding, count_chat_prompt};

/// Everything the handlers share.
#[derive(Debug)]
pub(crate) struct MockState {
    pub(crate) config: MockConfig,
    pub(crate) limits: ProviderLimits,
    pub(crate) stats: Arc<MockStats>,
}

/// The mock's routes.
pub(crate) fn router(state: Arc<MockState>) -> Router {
    // Azure OpenAI's shape: one URL per deployment, an `api-version` on
    // every call and the key in `api-key`, as Azure insists.
    let azure = Router::new()
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(chat_completions),
        )
        .route(
            "/openai/deployments/{deployment}/completions",
            post(completions),
        )
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(embeddings),
        )
        .route_layer(axum::middleware::from_fn(azure_gate));
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .merge(azure)
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/mock/stats", get(stats))
        .fallback(unknown_url)
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

/// What every completion-like request carries into its response.
struct Call {
    started: Instant,
    fault: Option<Fault>,
    limits: LimitStatus,
}

fn openai_error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
    message: &str,
) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    (status, axum::Json(body)).into_response()
}

/// What Azure answers to a call without an `api-version` or an `api-key`.
async fn azure_gate(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let versioned = req.uri().query().is_some_and(|q| {
        q.split('&').any(|p| {
            p.strip_prefix("api-version=")
                .is_some_and(|v| !v.is_empty())
        })
    });
    if !versioned {
        return openai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("404"),
            None,
            "Resource not found",
        );
    }
    if req.headers().get("api-key").is_none() {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("401"),
            None,
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
        );
    }
    next.run(req).await
}

fn request_id() -> String {
    format!("req_{:032x}", fastrand::u128(..))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// OpenAI's headers on every response.
fn finish(mut resp: Response, started: Instant, limits: &LimitStatus) -> Response {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id()) {
        h.insert("x-request-id", v);
    }
    h.insert("openai-version", HeaderValue::from_static("2020-10-01"));
    h.insert("openai-organization", HeaderValue::from_static("org-mock"));
    if let Ok(v) = HeaderValue::from_str(&started.elapsed().as_millis().to_string()) {
        h.insert("openai-processing-ms", v);
    }
    limits.write_headers(h);
    resp
}

/// The caller's key: a bearer token, or Azure's `api-key` header.
fn api_key(headers: &HeaderMap) -> Option<&str> {
    let key = match headers.get(AUTHORIZATION) {
        Some(v) => {
            let v = v.to_str().ok()?;
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))?
        }
        None => headers.get("api-key")?.to_str().ok()?,
    }
    .trim();
    (!key.is_empty()).then_some(key)
}

fn pick_fault(config: &MockConfig, headers: &HeaderMap) -> Result<Option<Fault>, Response> {
    if let Some(v) = headers.get(FAULT_HEADER) {
        let s = v.to_str().unwrap_or_default();
        return s.parse().map(Some).map_err(|e: crate::Error| {
            openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                None,
                &e.to_string(),
            )
        });
    }
    Ok(config
        .fault
        .filter(|_| config.fault_rate >= 1.0 || fastrand::f64() < config.fault_rate))
}

/// Authentication and the faults that do not need the body; `Err` is the
/// whole answer.
async fn prologue(
    state: &MockState,
    headers: &HeaderMap,
    killer: Option<&ConnectionKiller>,
) -> Result<Call, Response> {
    let started = Instant::now();
    state.stats.record(Event::Received);
    if api_key(headers).is_none() {
        return Err(openai_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            None,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        ));
    }
    let fault = pick_fault(&state.config, headers)?;
    if fault.is_some() {
        state.stats.record(Event::Faulted);
    }
    let quota = state.config.insufficient_quota || fault == Some(Fault::InsufficientQuota);
    if quota {
        return Err(openai_error(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            Some("insufficient_quota"),
            None,
            "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
        ));
    }
    match fault {
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Err(openai_error(
                status,
                "server_error",
                None,
                None,
                "The server had an error while processing your request. Sorry about that!",
            ))
        }
        Some(Fault::RateLimited(wait)) => Err(rate_limited(
            "gpt-4o",
            &LimitRefusal::Wait {
                dimension: Dimension::Requests,
                limit: 1,
                used: 1,
                requested: 1,
                wait,
            },
        )),
        Some(Fault::Overloaded) => {
            let body = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
            let status = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            Err((status, axum::Json(body)).into_response())
        }
        Some(Fault::Hang) => {
            // Bounded so a forgotten request cannot pin a task forever.
            tokio::time::sleep(Duration::from_secs(600)).await;
            Err(StatusCode::GATEWAY_TIMEOUT.into_response())
        }
        Some(Fault::Reset) => {
            if let Some(k) = killer {
                k.kill();
                std::future::pending::<()>().await;
            }
            Err(Response::new(Body::from_stream(stream::once(async {
                Err::<Bytes, _>(std::io::Error::other("injected reset"))
            }))))
        }
        _ => Ok(Call {
            started,
            fault,
            limits: LimitStatus::default(),
        }),
    }
}

fn rate_limited(model: &str, refusal: &LimitRefusal) -> Response {
    let (message, kind, wait) = match *refusal {
        LimitRefusal::Wait {
            dimension,
            limit,
            used,
            requested,
            wait,
        } => {
            let (kind, what) = match dimension {
                Dimension::Requests => ("requests", "requests per min (RPM)"),
                Dimension::Tokens => ("tokens", "tokens per min (TPM)"),
            };
            (
                format!(
                    "Rate limit reached for {model} in organization org-mock on {what}: Limit {limit}, Used {used}, Requested {requested}. Please try again in {}. Visit https://platform.openai.com/account/rate-limits to learn more.",
                    format_reset(wait)
                ),
                kind,
                Some(wait),
            )
        }
        LimitRefusal::TooLarge { limit, requested } => (
            format!(
                "Request too large for {model} in organization org-mock on tokens per min (TPM): Limit {limit}, Requested {requested}. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
            ),
            "tokens",
            None,
        ),
    };
    let mut resp = openai_error(
        StatusCode::TOO_MANY_REQUESTS,
        kind,
        Some("rate_limit_exceeded"),
        None,
        &message,
    );
    if let Some(wait) = wait {
        let h = resp.headers_mut();
        let secs = wait.as_nanos().div_ceil(1_000_000_000).max(1);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            h.insert(RETRY_AFTER, v);
        }
        if let Ok(v) = HeaderValue::from_str(&wait.as_millis().max(1).to_string()) {
            h.insert("retry-after-ms", v);
        }
    }
    resp
}

fn parse_error(e: &serde_json::Error) -> Response {
    openai_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        None,
        None,
        &format!(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.) ({e})"
        ),
    )
}

fn missing(param: &str) -> Response {
    openai_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("missing_required_parameter"),
        Some(param),
        &format!("Missing required parameter: '{param}'."),
    )
}

fn check_model<'m>(state: &MockState, model: Option<&'m str>) -> Result<&'m str, Response> {
    let model = model.ok_or_else(|| missing("model"))?;
    if state.config.models.iter().any(|m| m == model) {
        Ok(model)
    } else {
        Err(openai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            None,
            &format!("The model `{model}` does not exist or you do not have access to it."),
        ))
    }
}

/// Charges the mock's own limits; `Err` is the 429.
fn admit(
    state: &MockState,
    call: &mut Call,
    headers: &HeaderMap,
    model: &str,
    tokens: u64,
) -> Result<(), Response> {
    let key = api_key(headers).unwrap_or_default();
    let (status, refusal) = state.limits.admit(key, tokens);
    call.limits = status;
    match refusal {
        None => Ok(()),
        Some(r) => {
            state.stats.record(Event::RateLimited);
            Err(finish(rate_limited(model, &r), call.started, &call.limits))
        }
    }
}

/// Which kind of completion a reply is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Chat,
    Text,
}

/// One completion to produce.
struct Reply {
    flavor: Flavor,
    id: String,
    model: String,
    created: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    choices: u64,
    finish_reason: &'static str,
}

impl Reply {
    fn usage(&self) -> Value {
        let completion = self.completion_tokens * self.choices;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        })
    }

    fn body(&self) -> Value {
        let text = text::generate_words(self.completion_tokens);
        let choices: Vec<Value> = (0..self.choices)
            .map(|index| match self.flavor {
                Flavor::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []},
                    "logprobs": null,
                    "finish_reason": self.finish_reason
                }),
                Flavor::Text => json!({"text": text, "index": index, "logprobs": null, "finish_reason": self.finish_reason}),
            })
            .collect();
        let object = match self.flavor {
            Flavor::Chat => "chat.completion",
            Flavor::Text => "text_completion",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": choices, "usage": self.usage(),
            "service_tier": "default", "system_fingerprint": "fp_mock"
        })
    }

    /// One streamed chunk; `usage_field` says whether chunks carry `"usage": null`.
    fn chunk(&self, choices: Value, usage: Option<Value>, usage_field: bool) -> Bytes {
        let object = match self.flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Text => "text_completion",
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "service_tier": "default", "system_fingerprint": "fp_mock", "choices": choices
        });
        if usage_field {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"data: ");
        // Serializing a Value cannot fail.
        let _ = serde_json::to_writer(&mut out, &v);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    fn delta(&self, index: u64, word: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        match self.flavor {
            Flavor::Chat => {
                let delta = match (first, word) {
                    (true, _) => json!({"role": "assistant", "content": "", "refusal": null}),
                    (false, Some(w)) => json!({"content": w}),
                    (false, None) => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Flavor::Text => {
                json!({"text": word.unwrap_or(""), "index": index, "logprobs": null, "finish_reason": finish})
            }
        }
    }
}

/// Counts a stream as cancelled if it is dropped before its end.
struct StreamGuard {
    stats: Arc<MockStats>,
    tokens_sent: u64,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.stats.add_completion_tokens(self.tokens_sent);
        if !self.finished {
            self.stats.record(Event::Cancelled);
        }
    }
}

fn sse_response(
    state: &Arc<MockState>,
    reply: Reply,
    include_usage: bool,
    fault: Option<Fault>,
) -> Response {
    let ttft = state.config.ttft;
    let per_token = state
        .config
        .tokens_per_second
        .filter(|&t| t > 0)
        .map(|t| Duration::from_secs_f64(1.0 / f64::from(t)));
    let trickle = match fault {
        Some(Fault::Trickle(d)) => Some(d),
        _ => None,
    };
    let cut_after = match fault {
        Some(Fault::Cut(n)) => Some(u64::from(n)),
        Some(Fault::Truncated | Fault::Malformed) => Some(reply.completion_tokens / 2),
        _ => None,
    };
    let garbage = fault == Some(Fault::Malformed);
    let guard = StreamGuard {
        stats: state.stats.clone(),
        tokens_sent: 0,
        finished: false,
    };
    let total = reply.completion_tokens;
    // Steps: 0 = role chunk, 1..=total = words, total+1 = finish, total+2 = usage, total+3 = [DONE].
    let body = stream::unfold(
        (0u64, reply, guard),
        move |(step, reply, mut guard)| async move {
            if step > total + 3 {
                return None;
            }
            let delay = if step == 0 {
                ttft
            } else if step <= total {
                per_token.unwrap_or_default()
            } else {
                Duration::ZERO
            };
            let delay = trickle.unwrap_or(delay);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if cut_after.is_some_and(|c| step == c + 1) {
                if garbage {
                    return Some((
                        Ok(Bytes::from_static(
                            b"data: {\"id\": \"chatcmpl-broken\", \"choices\": [{\"delta\": \n\n",
                        )),
                        (total + 4, reply, guard),
                    ));
                }
                // Let the server flush what came before, so the cut falls after
                // those bytes reached the wire, as a real one does.
                tokio::task::yield_now().await;
                return Some((
                    Err(std::io::Error::other("injected stream cut")),
                    (total + 4, reply, guard),
                ));
            }
            let out = if step == 0 {
                let choices: Vec<Value> = (0..reply.choices)
                    .map(|i| reply.delta(i, None, reply.flavor == Flavor::Chat, None))
                    .collect();
                reply.chunk(Value::Array(choices), None, include_usage)
            } else if step <= total {
                let w = text::word(step - 1);
                guard.tokens_sent += reply.choices;
                let choices: Vec<Value> = (0..reply.choices)
                    .map(|i| reply.delta(i, Some(w), false, None))
                    .collect();
                reply.chunk(Value::Array(choices), None, include_usage)
            } else if step == total + 1 {
                let choices: Vec<Value> = (0..reply.choices)
                    .map(|i| reply.delta(i, None, false, Some(reply.finish_reason)))
                    .collect();
                reply.chunk(Value::Array(choices), None, include_usage)
            } else if step == total + 2 {
                if !include_usage {
                    return Some((Ok(Bytes::new()), (step + 1, reply, guard)));
                }
                reply.chunk(Value::Array(vec![]), Some(reply.usage()), true)
            } else {
                guard.finished = true;
                guard.stats.record(Event::Completed);
                Bytes::from_static(b"data: [DONE]\n\n")
            };
            Some((Ok::<_, std::io::Error>(out), (step + 1, reply, guard)))
        },
    );
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

async fn json_response(
    state: &MockState,
    body: Value,
    completion_tokens: u64,
    fault: Option<Fault>,
) -> Response {
    let latency = state.config.ttft
        + state
            .config
            .tokens_per_second
            .filter(|&t| t > 0)
            .map_or(Duration::ZERO, |t| {
                Duration::from_secs_f64(completion_tokens as f64 / f64::from(t))
            });
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let bytes = match serde_json::to_vec(&body) {
        Ok(b) => b,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    match fault {
        Some(Fault::Truncated) => {
            let half = bytes.len() / 2;
            return json_bytes(Bytes::copy_from_slice(&bytes[..half]));
        }
        Some(Fault::Malformed) => {
            return json_bytes(Bytes::from_static(b"{\"id\": \"chatcmpl-broken\", \"choices\": [{\"message\": <html>Bad Gateway</html>"));
        }
        Some(Fault::Cut(_)) => {
            let half = Bytes::copy_from_slice(&bytes[..bytes.len() / 2]);
            let body = stream::unfold(Some(half), |half| async move {
                match half {
                    Some(h) => Some((Ok(h), None)),
                    None => {
                        // As for streams: the first half is on the wire before the cut.
                        tokio::task::yield_now().await;
                        Some((Err(std::io::Error::other("injected cut")), None))
                    }
                }
            })
            .take(2);
            let mut resp = Response::new(Body::from_stream(body));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return resp;
        }
        Some(Fault::Trickle(every)) => {
            let pieces: Vec<Bytes> = bytes.chunks(16).map(Bytes::copy_from_slice).collect();
            let body = stream::unfold(pieces.into_iter(), move |mut it| async move {
                let piece = it.next()?;
                tokio::time::sleep(every).await;
                Some((Ok::<_, std::io::Error>(piece), it))
            });
            let mut resp = Response::new(Body::from_stream(body));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            state.stats.record(Event::Completed);
            return resp;
        }
        _ => {}
    }
    state.stats.record(Event::Completed);
    state.stats.add_completion_tokens(completion_tokens);
    json_bytes(Bytes::from(bytes))
}

fn json_bytes(bytes: Bytes) -> Response {
    let mut resp = Response::new(Body::from(bytes));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn completion_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", fastrand::u128(..) >> 32)
}

async fn chat_completions(
    State(state): State<Arc<MockState>>,
    killer: Option<axum::Extension<ConnectionKiller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut call = match prologue(&state, &headers, killer.as_deref()).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let req: ChatRequest<'_> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return parse_error(&e),
    };
    let model = match check_model(&state, req.model.as_deref()) {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let Some(messages) = req.messages.as_deref() else {
        return missing("messages");
    };
    let encoding = Encoding::for_model(model, Encoding::O200k);
    let prompt_tokens = count_chat_prompt(encoding, messages);
    let choices = req.n.unwrap_or(1).clamp(1, 128);
    let completion_tokens = req
        .output_cap()
        .unwrap_or(state.config.default_completion_tokens);
    if let Err(resp) = admit(
        &state,
        &mut call,
        &headers,
        model,
        prompt_tokens + completion_tokens * choices,
    ) {
        return resp;
    }
    let reply = Reply {
        flavor: Flavor::Chat,
        id: completion_id("chatcmpl"),
        model: model.to_owned(),
        created: unix_now(),
        prompt_tokens,
        completion_tokens,
        choices,
        finish_reason: if req.output_cap().is_some() {
            "length"
        } else {
            "stop"
        },
    };
    let resp = if req.is_stream() {
        sse_response(&state, reply, req.wants_stream_usage(), call.fault)
    } else {
        json_response(
            &state,
            reply.body(),
            completion_tokens * choices,
            call.fault,
        )
        .await
    };
    finish(resp, call.started, &call.limits)
}

async fn completions(
    State(state): State<Arc<MockState>>,
    killer: Option<axum::Extension<ConnectionKiller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut call = match prologue(&state, &headers, killer.as_deref()).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let req: CompletionRequest<'_> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return parse_error(&e),
    };
    let model = match check_model(&state, req.model.as_deref()) {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let Some(prompt) = req.prompt.as_ref() else {
        return missing("prompt");
    };
    let encoding = Encoding::for_model(model, Encoding::Cl100k);
    let prompt_tokens = prompt.tokens(encoding);
    let choices = prompt.len().max(1) as u64;
    let completion_tokens = req
        .max_tokens
        .unwrap_or(state.config.default_completion_tokens);
    if let Err(resp) = admit(
        &state,
        &mut call,
        &headers,
        model,
        prompt_tokens + completion_tokens * choices,
    ) {
        return resp;
    }
    let reply = Reply {
        flavor: Flavor::Text,
        id: completion_id("cmpl"),
        model: model.to_owned(),
        created: unix_now(),
        prompt_tokens,
        completion_tokens,
        choices,
        finish_reason: if req.max_tokens.is_some() {
            "length"
        } else {
            "stop"
        },
    };
    let resp = if req.stream.unwrap_or(false) {
        let usage = req.stream_options.is_some_and(|o| o.include_usage);
        sse_response(&state, reply, usage, call.fault)
    } else {
        json_response(
            &state,
            reply.body(),
            completion_tokens * choices,
            call.fault,
        )
        .await
    };
    finish(resp, call.started, &call.limits)
}

/// A deterministic unit vector for `seed`.
fn embedding_vector(seed: u64, dims: usize) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v: Vec<f32> = (0..dims).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn embeddings(
    State(state): State<Arc<MockState>>,
    killer: Option<axum::Extension<ConnectionKiller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut call = match prologue(&state, &headers, killer.as_deref()).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let req: EmbeddingRequest<'_> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return parse_error(&e),
    };
    let model = match check_model(&state, req.model.as_deref()) {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let Some(input) = req.input.as_ref() else {
        return missing("input");
    };
    let prompt_tokens = input.tokens(Encoding::Cl100k);
    if let Err(resp) = admit(&state, &mut call, &headers, model, prompt_tokens) {
        return resp;
    }
    let dims = req
        .dimensions
        .unwrap_or(if model.ends_with("-large") {
            3072
        } else {
            1536
        })
        .clamp(1, 8192);
    let base64 = req.encoding_format.as_deref() == Some("base64");
    let data: Vec<Value> = (0..input.len())
        .map(|i| {
            let v = embedding_vector(fnv1a(&body) ^ i as u64, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    });
    let resp = json_response(&state, body, 0, call.fault).await;
    finish(resp, call.started, &call.limits)
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_715_367_049, "owned_by": "system"})
}

async fn list_models(State(state): State<Arc<MockState>>, headers: HeaderMap) -> Response {
    if api_key(&headers).is_none() {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            None,
            "You didn't provide an API key.",
        );
    }
    let data: Vec<Value> = state
        .config
        .models
        .iter()
        .map(|m| model_object(m))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(State(state): State<Arc<MockState>>, Path(id): Path<String>) -> Response {
    match check_model(&state, Some(&id)) {
        Ok(m) => axum::Json(model_object(m)).into_response(),
        Err(resp) => resp,
    }
}

async fn stats(State(state): State<Arc<MockState>>) -> Response {
    axum::Json(state.stats.snapshot()).into_response()
}

async fn unknown_url(method: http::Method, uri: http::Uri) -> Response {
    openai_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        None,
        None,
        &format!("Invalid URL ({method} {})", uri.path()),
    )
}
