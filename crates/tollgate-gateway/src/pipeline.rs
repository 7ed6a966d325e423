//! A request's life, top to bottom:
//!
//! 1. **auth** — the bearer key, from the in-memory key table (401/403);
//! 2. **read** — content type, size limit, UTF-8, JSON (400/413/415);
//! 3. **route** — the model's pool of deployments (404), the key's model
//!    list (403);
//! 4. **admission** — budgets and credits (429/402), then limits (429);
//! 5. **upstream** — the pool's healthy deployments in turn: a 429 cools
//!    one down and moves on at once, a failure moves on (502/504 when all
//!    fail, 429 with the first reopening when all are cooling);
//! 6. **relay** — the body as one piece, or the stream chunk by chunk as it
//!    arrives; a client that hangs up drops the upstream call with it;
//! 7. **settle** — limits and bill corrected to the real usage, and the
//!    usage row made durable before the answer's last byte goes out.

use crate::config::ServerConfig;
use crate::dashboard::budget_reason;
use crate::error::{Error, api_error_response, write_retry_advice};
use crate::header_names as names;
use crate::limits::Plan;
use crate::metrics::Decision;
use crate::routing::{Failed, Pool, Sent, trigger_of};
use crate::server::serving_request;
use crate::stream::{Prompt, UsageTap};
use crate::transport::UpstreamBody;
use crate::upstream::{Call, Deployment, Endpoint, Outcome, Timeouts};
use crate::{Gateway, idempotency};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Limited};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_core::duration::write_reset;
use tollgate_core::limits::{Cost, Grant};
use tollgate_core::money::{Micros, TokenUsage, USD_TEXT_MAX, Usd};
use tollgate_core::openai::{
    ChatRequest, CompletionRequest, EmbeddingRequest, UsageOnly, with_model,
};
use tollgate_core::tokens::{Estimate, Estimator};
use tollgate_core::{ApiError, ErrorType};
use tollgate_store::book::{MoneyRefusal, Remaining};
use tollgate_store::{KeyRecord, UsageRow};

/// What the access log line says about a proxied request.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestLog {
    pub(crate) key: Option<Arc<str>>,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) deployment: Option<Arc<str>>,
    pub(crate) stream: bool,
    /// Tokens charged at admission.
    pub(crate) estimate: Option<u64>,
    /// Time spent queued for a limit.
    pub(crate) queued: Option<Duration>,
    /// Time spent waiting on the upstream: until its whole body arrived, or
    /// until its response headers for a stream. The access log subtracts it
    /// from the total to show the gateway's own overhead.
    pub(crate) upstream: Option<Duration>,
    /// What the request cost (known before the answer for bodies only).
    pub(crate) cost: Option<Micros>,
    /// Budget and credits left.
    pub(crate) remaining: Remaining,
    /// Deployments tried.
    pub(crate) attempts: u32,
    /// The fallback chain walked (`gpt-4o>gpt-4o-mini`), when one was.
    pub(crate) fallback: Option<String>,
    /// What admission decided.
    pub(crate) decision: Decision,
}

/// Upstream calls a pool's result took.
fn attempt_count(result: &Result<Sent, Failed>) -> u32 {
    match result {
        Ok(s) => s.attempts,
        Err(f) => f.attempts,
    }
}

/// Bodies above this size are tokenized off the async workers.
const LARGE_BODY: usize = 32 << 10;

/// What routing and admission need from a request body.
pub(crate) struct Summary {
    model: Arc<str>,
    stream: bool,
    /// The client asked for the usage chunk at the end of its stream.
    wants_stream_usage: bool,
    /// `stream_options` is present (so asking for usage means rewriting it).
    has_stream_options: bool,
    /// The request's `user`.
    user: Option<Box<str>>,
    /// Token estimate, when a limit counts tokens.
    pub(crate) estimate: Option<Estimate>,
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    dispatch(&gw, Endpoint::ChatCompletions, req).await
}

/// `POST /v1/completions`.
pub(crate) async fn completions(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    dispatch(&gw, Endpoint::Completions, req).await
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    dispatch(&gw, Endpoint::Embeddings, req).await
}

async fn dispatch(gw: &Arc<Gateway>, endpoint: Endpoint, req: Request) -> Response {
    if req.headers().contains_key(&names::IDEMPOTENCY_KEY) {
        idempotency::proxy(gw, endpoint, req).await
    } else {
        proxy(gw, endpoint, req).await
    }
}

/// Serves one request through the whole pipeline.
pub(crate) async fn proxy(gw: &Gateway, endpoint: Endpoint, req: Request) -> Response {
    let mut log = RequestLog::default();
    let mut standing = Grant::default();
    let mut resp = match run(gw, endpoint, req, &mut log, &mut standing).await {
        Ok(resp) => resp,
        Err(e) => {
            if let Error::RateLimited(r) = &e {
                standing = r.refusal.standing;
            }
            note_refusal(gw, &e, &mut log);
            e.into_response()
        }
    };
    let h = resp.headers_mut();
    write_ratelimit_headers(h, &standing);
    write_money_headers(h, &log);
    if let Some(v) = log
        .model
        .as_deref()
        .and_then(|m| HeaderValue::from_str(m).ok())
    {
        h.insert(names::MODEL.clone(), v);
    }
    if let Some(v) = log
        .deployment
        .as_deref()
        .and_then(|d| HeaderValue::from_str(d).ok())
    {
        h.insert(names::DEPLOYMENT.clone(), v);
        if let Some(v) = log
            .fallback
            .as_deref()
            .and_then(|f| HeaderValue::from_str(f).ok())
        {
            h.insert(names::FALLBACK.clone(), v);
        }
        h.insert(
            names::ATTEMPTS.clone(),
            HeaderValue::from(log.attempts.max(1)),
        );
    }
    resp.extensions_mut().insert(log);
    resp
}

/// Labels a refusal's decision for the metrics and counts its subject for
/// the dashboard's top throttled list.
fn note_refusal(gw: &Gateway, e: &Error, log: &mut RequestLog) {
    let (decision, scope, reason): (_, Arc<str>, _) = match e {
        Error::RateLimited(r) => (
            Decision::RateLimited,
            Arc::from(r.scope.as_str()),
            r.refusal.kind.as_str(),
        ),
        Error::Money(r) => match &**r {
            MoneyRefusal::Budget { scope, window, .. } => (
                Decision::BudgetExceeded,
                scope.clone(),
                budget_reason(*window),
            ),
            MoneyRefusal::Credits { account, .. } => (
                Decision::InsufficientCredits,
                Arc::from(format!("account:{account}")),
                "credits",
            ),
        },
        Error::RoutesCooling { .. } | Error::TooLargeForRoutes { .. } => {
            let model = log.model.as_deref().unwrap_or("-");
            (
                log.decision,
                Arc::from(format!("upstream:{model}")),
                "provider_limit",
            )
        }
        _ => return,
    };
    log.decision = decision;
    let now_ms = (gw.limits.clock().now_ns() / 1_000_000) as i64;
    gw.dashboard.throttles.record(scope, reason, now_ms);
}

/// `x-tollgate-cost-usd`, `x-tollgate-budget-remaining-usd` and
/// `x-tollgate-credits-remaining-usd`, for what is known.
fn write_money_headers(h: &mut HeaderMap, log: &RequestLog) {
    for (name, amount) in [
        (&names::COST_USD, log.cost),
        (&names::BUDGET_REMAINING_USD, log.remaining.budget),
        (&names::CREDITS_REMAINING_USD, log.remaining.credits),
    ] {
        if let Some(v) =
            amount.and_then(|a| HeaderValue::from_str(Usd(a).text(&mut [0; USD_TEXT_MAX])).ok())
        {
            h.insert(name.clone(), v);
        }
    }
}

/// OpenAI's `x-ratelimit-*` sextet for the tightest request and token limits.
fn write_ratelimit_headers(h: &mut HeaderMap, standing: &Grant) {
    let mut buf = String::with_capacity(16);
    for (reading, [limit, remaining, reset]) in [
        (standing.requests, &names::RATELIMIT_REQUESTS),
        (standing.tokens, &names::RATELIMIT_TOKENS),
    ] {
        let Some(r) = reading else { continue };
        h.insert(limit.clone(), HeaderValue::from(r.limit));
        h.insert(remaining.clone(), HeaderValue::from(r.remaining));
        buf.clear();
        write_reset(&mut buf, r.reset);
        if let Ok(v) = HeaderValue::from_str(&buf) {
            h.insert(reset.clone(), v);
        }
    }
}

/// Longest end-user id kept: ids are limiter keys held in memory, and a
/// client must not make them arbitrarily large.
const MAX_USER_BYTES: usize = 256;

/// The end user a request names: `x-tollgate-user`, else the body's `user`
/// (cut at [`MAX_USER_BYTES`], which can only merge, never split, users).
fn end_user<'a>(headers: &'a HeaderMap, summary: &'a Summary) -> Option<&'a str> {
    let user = headers
        .get(&names::USER)
        .and_then(|v| v.to_str().ok())
        .filter(|u| !u.is_empty())
        .or(summary.user.as_deref())
        .filter(|u| !u.is_empty())?;
    let mut end = user.len().min(MAX_USER_BYTES);
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    Some(&user[..end])
}

/// A duration header such as `x-tollgate-max-wait: 30s`.
fn duration_header(
    headers: &HeaderMap,
    name: &'static HeaderName,
) -> Result<Option<Duration>, Error> {
    let header = name.as_str();
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or_default().trim();
    humantime::parse_duration(text)
        .map(Some)
        .map_err(|_| Error::InvalidHeader {
            header,
            expected: "a duration such as \"30s\" or \"500ms\"",
        })
}

/// The request's own upstream timeouts, each positive and at most `max`.
fn requested_timeouts(headers: &HeaderMap, max: Duration) -> Result<Timeouts, Error> {
    let bounded = |name: &'static HeaderName| match duration_header(headers, name)? {
        Some(d) if d.is_zero() || d > max => Err(Error::HeaderOutOfRange {
            header: name.as_str(),
            max,
        }),
        d => Ok(d),
    };
    Ok(Timeouts {
        first_byte: bounded(&names::FIRST_BYTE_TIMEOUT)?,
        total: bounded(&names::TIMEOUT)?,
    })
}

async fn run(
    gw: &Gateway,
    endpoint: Endpoint,
    req: Request,
    log: &mut RequestLog,
    standing: &mut Grant,
) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();

    // 1. auth
    let caller = gw.keys.authenticate(&parts.headers).await?;
    log.key = Some(caller.name.clone());

    // 2. read
    let body = read_json_body(&parts.headers, body, &gw.config.server).await?;
    let estimator =
        (caller.policy.counts_tokens || gw.money.may_charge(&caller) || gw.paces_tokens())
            .then_some(gw.estimator);
    let summary = if estimator.is_some() && body.len() > LARGE_BODY {
        // Tokenizing runs at about 4M tokens/s: a large prompt takes
        // milliseconds, which belong on the blocking pool, not on a worker
        // that other requests are waiting for.
        let body = body.clone();
        tokio::task::spawn_blocking(move || summarize(endpoint, &body, estimator.as_ref()))
            .await
            .map_err(|e| Error::Internal(format!("token estimate task failed: {e}")))??
    } else {
        summarize(endpoint, &body, estimator.as_ref())?
    };
    log.model = Some(summary.model.clone());
    log.stream = summary.stream;

    // 3. route
    let pool = route(gw, &caller.record, &summary.model)?;

    // 4. admission: money first (a spent budget is final, so it is the
    // answer even when a rate limit would also refuse), then limits.
    let user = end_user(&parts.headers, &summary);
    let max_wait = duration_header(&parts.headers, &names::MAX_WAIT)?.or(caller.policy.max_wait);
    let timeouts = requested_timeouts(&parts.headers, gw.config.routing.max_request_timeout)?;
    let request_id = serving_request();
    let request_id = request_id.as_ref().and_then(|id| id.to_str().ok());
    let request_id = request_id.unwrap_or_default();
    let money_plan = gw.money.plan(&caller, user, &summary.model)?;
    let mut bill = gw
        .money
        .open(
            money_plan,
            summary.estimate,
            UsageRow {
                request_id: request_id.to_owned(),
                key_id: Some(caller.id.clone()),
                key_name: Some(caller.name.clone()),
                user: user.map(str::to_owned),
                team: caller.team.clone(),
                model: summary.model.clone(),
                streamed: summary.stream,
                ..UsageRow::default()
            },
        )
        .await?;
    let estimate = summary.estimate.map_or(0, |e| e.total());
    let cost = Cost {
        requests: 1,
        tokens: estimate,
    };
    let mut seeded = false;
    let admission = loop {
        let plan = Plan::new(&caller.id, &caller.policy, &summary.model, user);
        let decided = gw
            .limits
            .admit(
                plan,
                cost,
                &caller.id,
                &caller.name,
                max_wait,
                bill.deferred(),
            )
            .await;
        match decided {
            Ok(a) => break a,
            // Redis lacked some of the money counts: sum them from the
            // ledger, once, and decide again.
            Err(Error::MoneyUnseeded(unknown)) if !seeded => {
                seeded = true;
                if let Err(e) = gw.money.seed_for(&bill, &unknown).await {
                    bill.cancel();
                    return Err(e);
                }
            }
            Err(e) => {
                bill.cancel();
                return Err(e);
            }
        }
    };
    bill.admitted(admission.money);
    log.remaining = bill.remaining;
    *standing = admission.grant;
    log.estimate = summary.estimate.map(|e| e.total());
    log.queued = Some(admission.waited).filter(|w| !w.is_zero());
    log.decision = if log.queued.is_some() {
        Decision::Queued
    } else {
        Decision::Admitted
    };

    // 5. upstream. A stream is settled on its usage chunk; ask for one.
    let tapped = summary.stream && (summary.estimate.is_some() || gw.money.keeps_ledger());
    let ask_usage = tapped && !summary.wants_stream_usage;
    let body = if ask_usage {
        with_stream_usage(&body, summary.has_stream_options)?
    } else {
        body
    };
    let passthrough = provider_headers(&parts.headers);
    let sent = Instant::now();
    let clock = gw.limits.clock();
    let routing = &gw.config.routing;
    let mut call = Call {
        endpoint,
        body: body.clone(),
        passthrough: &passthrough,
        cost,
        timeouts,
    };
    let mut result = pool.send(|| clock.now_ns(), routing, &call).await;
    let mut attempts = attempt_count(&result);
    let mut walked: Vec<&str> = Vec::new();
    // Down the model's fallback chain while the failure is one it is for;
    // nothing has reached the client yet, streams included.
    for fallback in routing.fallbacks.get(&*summary.model).into_iter().flatten() {
        if !trigger_of(&result).is_some_and(|t| routing.fallback_on.contains(&t)) {
            break;
        }
        let Some(next) = gw
            .routes
            .get(fallback)
            .filter(|_| caller.record.allows_model(fallback))
        else {
            continue;
        };
        let Some(rewritten) = with_model(&body, fallback) else {
            break;
        };
        if walked.is_empty() {
            walked.push(&summary.model);
        }
        walked.push(fallback);
        tracing::debug!(model = %summary.model, fallback, "falling back");
        crate::metrics::fallback(summary.model.clone(), Arc::from(fallback.as_str()));
        bill.reprice(fallback);
        call.body = Bytes::from(rewritten);
        result = next.send(|| clock.now_ns(), routing, &call).await;
        attempts += attempt_count(&result);
    }
    log.attempts = attempts;
    if !walked.is_empty() {
        log.fallback = Some(walked.join(">"));
        log.model = walked.last().map(|m| Arc::from(*m));
    }
    let (deployment, outcome) = match result {
        Ok(s) => {
            log.deployment = Some(s.deployment.name.clone());
            bill.set_deployment(s.deployment.name.clone());
            (s.deployment, s.outcome)
        }
        Err(f) => {
            log.deployment = f.deployment.as_ref().map(|d| d.name.clone());
            if let Some(d) = &f.deployment {
                bill.set_deployment(d.name.clone());
            }
            // Nothing was generated: give the tokens and the money back.
            admission.settle(0);
            bill.settle(None, f.error.to_api_error().status, None);
            return Err(f.error);
        }
    };
    let deployment = &deployment;

    // 6. relay
    let resp = match outcome {
        Outcome::Success(upstream) if summary.stream => {
            log.upstream = Some(sent.elapsed());
            let tap = tapped.then(|| {
                let prompt = match summary.estimate {
                    Some(e) => Prompt::Counted(e),
                    None => Prompt::Uncounted {
                        endpoint,
                        body: call.body.clone(),
                        estimator: gw.estimator,
                    },
                };
                UsageTap::new(Some(admission), Some(bill), prompt, ask_usage)
            });
            relay_stream(deployment, upstream, tap)
        }
        Outcome::Success(upstream) => {
            let upstream_id = upstream_request_id(&upstream);
            let status = upstream.status();
            let body = match upstream.into_body().bytes().await {
                Ok(b) => b,
                Err(e) => {
                    admission.settle(0);
                    let e = deployment.body_error(e);
                    bill.settle(None, e.to_api_error().status, None);
                    return Err(e);
                }
            };
            log.upstream = Some(sent.elapsed());
            // Checked as UTF-8 in one pass, then parsed as text: from
            // bytes, serde_json checks each string it meets on its own.
            let parsed = std::str::from_utf8(&body)
                .map_err(|e| format!("body is not UTF-8 past byte {}", e.valid_up_to()))
                .and_then(|text| {
                    serde_json::from_str::<UsageOnly>(text)
                        .map_err(|e| format!("body is not valid JSON: {e}"))
                });
            match parsed {
                Ok(parsed) => {
                    // No usage block (some servers): the estimate stands.
                    let usage = parsed.usage.map(|u| u.priced()).or_else(|| {
                        summary.estimate.map(|e| TokenUsage {
                            input: e.prompt,
                            cached_input: 0,
                            output: e.output,
                        })
                    });
                    let tokens = usage.map_or(admission.estimate, |u| u.input + u.output);
                    admission.settle(tokens);
                    let settled = bill.settle(usage, status.as_u16(), parsed.model);
                    log.cost = Some(settled.cost);
                    log.remaining = settled.remaining;
                    // The row is durable before the client has its answer.
                    if let Some(d) = settled.durable {
                        d.wait().await;
                    }
                    relay_body(status, upstream_id, body)
                }
                Err(detail) => {
                    admission.settle(0);
                    let e = Error::UpstreamInvalid {
                        deployment: deployment.name.to_string(),
                        detail,
                    };
                    bill.settle(None, e.to_api_error().status, None);
                    return Err(e);
                }
            }
        }
        Outcome::CallerError {
            status,
            content_type,
            body,
        } => {
            admission.settle(0);
            bill.settle(None, status.as_u16(), None);
            let mut resp = (status, body).into_response();
            if let Some(ct) = content_type {
                resp.headers_mut().insert(CONTENT_TYPE, ct);
            }
            resp.headers_mut().insert(
                names::SHOULD_RETRY.clone(),
                HeaderValue::from_static("false"),
            );
            resp
        }
        Outcome::Throttled {
            body,
            retry_after,
            quota_exhausted,
        } => {
            admission.settle(0);
            bill.settle(None, 429, None);
            let mut resp = (StatusCode::TOO_MANY_REQUESTS, body).into_response();
            // insufficient_quota is billing: it never clears with time.
            write_retry_advice(resp.headers_mut(), !quota_exhausted, retry_after);
            resp
        }
    };
    Ok(resp)
}

/// The body with `stream_options.include_usage` set: spliced in when the
/// request has no `stream_options` (the common case, no re-encoding),
/// otherwise rewritten.
fn with_stream_usage(body: &Bytes, has_stream_options: bool) -> Result<Bytes, Error> {
    if has_stream_options {
        let mut v: serde_json::Value = serde_json::from_slice(body).map_err(json_error)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
        }
        return serde_json::to_vec(&v).map(Bytes::from).map_err(json_error);
    }
    // The body is a JSON object (summarize checked): insert the field right
    // after its opening brace.
    let open = body
        .iter()
        .position(|b| *b == b'{')
        .ok_or(Error::NotAnObject)?;
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
    let rest = &body[open + 1..];
    let empty_object = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut out = Vec::with_capacity(body.len() + FIELD.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(if empty_object {
        &FIELD[..FIELD.len() - 1]
    } else {
        FIELD
    });
    out.extend_from_slice(rest);
    Ok(Bytes::from(out))
}

/// Reads the body under the size limit and checks it is UTF-8 JSON text.
pub(crate) async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    server: &ServerConfig,
) -> Result<Bytes, Error> {
    let limit = server.max_body_bytes;
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
    // A client that stops sending mid-body is answered, not waited for; a
    // slow one that keeps sending is read to the end.
    let mut body = Limited::new(body, limit);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(1);
    loop {
        let frame = match tokio::time::timeout(server.read_timeout, body.frame()).await {
            Err(_) => return Err(Error::BodyTimeout(server.read_timeout)),
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(Error::BodyTooLarge { limit });
            }
            Ok(Some(Err(e))) => return Err(Error::BodyRead(e.to_string())),
        };
        if let Ok(data) = frame.into_data() {
            chunks.push(data);
        }
    }
    // Most bodies arrive as one chunk, kept as it is.
    let bytes = if chunks.len() == 1 {
        chunks.swap_remove(0)
    } else {
        Bytes::from(chunks.concat())
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

/// Reads what routing and admission need, checking the endpoint's required
/// fields; counts tokens only when `estimator` is given (a limit needs them).
pub(crate) fn summarize(
    endpoint: Endpoint,
    body: &[u8],
    estimator: Option<&Estimator>,
) -> Result<Summary, Error> {
    // One pass over the whole body, then parsed as text: from bytes,
    // serde_json checks each key and string on its own, a call each.
    // (read_json_body checked it too, but bytes cannot say so.)
    let body = std::str::from_utf8(body).map_err(|e| Error::InvalidUtf8(e.valid_up_to()))?;
    // serde would read a struct from a JSON array too; OpenAI wants an object.
    if body.trim_ascii_start().as_bytes().first() != Some(&b'{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(body) {
            Err(e) => Error::InvalidJson(e),
            Ok(_) => Error::NotAnObject,
        });
    }
    let owned = |m: &Option<std::borrow::Cow<'_, str>>| m.as_deref().map(Arc::<str>::from);
    let boxed = |u: &Option<std::borrow::Cow<'_, str>>| u.as_deref().map(Box::<str>::from);
    let summary = match endpoint {
        Endpoint::ChatCompletions => {
            let r: ChatRequest<'_> = serde_json::from_str(body).map_err(json_error)?;
            if r.messages.is_none() {
                return Err(Error::MissingField("messages"));
            }
            let model = owned(&r.model).ok_or(Error::MissingField("model"))?;
            Summary {
                estimate: estimator.map(|e| e.chat(&model, &r)),
                stream: r.is_stream(),
                wants_stream_usage: r.wants_stream_usage(),
                has_stream_options: r.stream_options.is_some(),
                user: boxed(&r.user),
                model,
            }
        }
        Endpoint::Completions => {
            let r: CompletionRequest<'_> = serde_json::from_str(body).map_err(json_error)?;
            if r.prompt.is_none() {
                return Err(Error::MissingField("prompt"));
            }
            let model = owned(&r.model).ok_or(Error::MissingField("model"))?;
            Summary {
                estimate: estimator.map(|e| e.completion(&model, &r)),
                stream: r.stream.unwrap_or(false),
                wants_stream_usage: r.stream_options.is_some_and(|o| o.include_usage),
                has_stream_options: r.stream_options.is_some(),
                user: boxed(&r.user),
                model,
            }
        }
        Endpoint::Embeddings => {
            let r: EmbeddingRequest<'_> = serde_json::from_str(body).map_err(json_error)?;
            if r.input.is_none() {
                return Err(Error::MissingField("input"));
            }
            let model = owned(&r.model).ok_or(Error::MissingField("model"))?;
            Summary {
                estimate: estimator.map(|e| e.embedding(&model, &r)),
                stream: false,
                wants_stream_usage: false,
                has_stream_options: false,
                user: boxed(&r.user),
                model,
            }
        }
    };
    if summary.model.is_empty() {
        return Err(Error::MissingField("model"));
    }
    Ok(summary)
}

fn route<'g>(gw: &'g Gateway, key: &KeyRecord, model: &str) -> Result<&'g Arc<Pool>, Error> {
    let pool = gw
        .routes
        .get(model)
        .ok_or_else(|| Error::ModelNotFound(model.to_owned()))?;
    if !key.allows_model(model) {
        return Err(Error::ModelNotAllowed {
            key: key.name.clone(),
            model: model.to_owned(),
        });
    }
    Ok(pool)
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

fn upstream_request_id(upstream: &http::Response<UpstreamBody>) -> Option<HeaderValue> {
    upstream.headers().get(&names::REQUEST_ID).cloned()
}

/// Headers a relayed answer carries at most (content type, request ids,
/// the `x-ratelimit-*` six, cost and balances, deployment): room for them
/// up front, so the map is not grown and rehashed twice on the way.
const RESPONSE_HEADERS: usize = 16;

fn relay_body(status: StatusCode, upstream_id: Option<HeaderValue>, body: Bytes) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.reserve(RESPONSE_HEADERS);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(id) = upstream_id {
        h.insert(names::UPSTREAM_REQUEST_ID.clone(), id);
    }
    resp
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

/// Relays a stream chunk by chunk as it arrives; with a tap, event by event
/// (the tap holds back a partial event until its end arrives). The tap
/// lives in the stream's state, so a client that hangs up drops it, and
/// with it the upstream call, and its drop settles the admission.
fn relay_stream(
    deployment: &Arc<Deployment>,
    upstream: http::Response<UpstreamBody>,
    tap: Option<UsageTap>,
) -> Response {
    let upstream_id = upstream_request_id(&upstream);
    let deployment = deployment.clone();
    let chunks = upstream.into_body();
    let body = stream::unfold(Some((chunks, tap)), move |state| {
        let deployment = deployment.clone();
        async move {
            let (mut chunks, mut tap) = state?;
            loop {
                match chunks.chunk().await {
                    Some(Ok(bytes)) => {
                        let out = match tap.as_mut() {
                            Some(t) => t.feed(&bytes),
                            None => bytes,
                        };
                        if !out.is_empty() {
                            return Some((Ok::<_, Infallible>(out), Some((chunks, tap))));
                        }
                    }
                    Some(Err(e)) => {
                        let err = deployment.body_error(e);
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
                        let mut out = match tap.as_mut() {
                            Some(t) => t.finish(502).await.to_vec(),
                            None => Vec::new(),
                        };
                        out.extend_from_slice(&stream_error_event(&api));
                        return Some((Ok(Bytes::from(out)), None));
                    }
                    None => {
                        let rest = match tap.as_mut() {
                            Some(t) => t.finish(200).await,
                            None => Bytes::new(),
                        };
                        return (!rest.is_empty()).then_some((Ok(rest), None));
                    }
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.reserve(RESPONSE_HEADERS);
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(id) = upstream_id {
        h.insert(names::UPSTREAM_REQUEST_ID.clone(), id);
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
        .filter(|m| key.record.allows_model(m))
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
    match route(&gw, &key.record, &model) {
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
