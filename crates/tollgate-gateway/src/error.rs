//! The gateway's errors, and the one place where each becomes a row of the
//! decision tree (DESIGN §1): [`Error::to_api_error`] is an exhaustive match,
//! so a new variant cannot ship without a decided status.

use crate::config::ConfigError;
use crate::header_names as names;
use crate::limits::RateLimited;
use axum::response::{IntoResponse, Response};
use http::HeaderValue;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use std::time::Duration;
use tollgate_core::duration::format_reset;
use tollgate_core::limits::{Dimension, RefusalKind};
use tollgate_core::money::{Usd, format_utc};
use tollgate_core::{ApiError, ErrorType};
use tollgate_store::book::MoneyRefusal;

/// Everything that can go wrong in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state layer failed.
    #[error(transparent)]
    Store(#[from] tollgate_store::Error),
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("server error: {0}")]
    Serve(std::io::Error),
    /// A bug or a failed internal task; the detail goes to the log only.
    #[error("internal error: {0}")]
    Internal(String),
    /// The HTTP client for upstreams could not be built.
    #[error("cannot build the upstream client for deployment `{deployment}`: {detail}")]
    UpstreamClient {
        /// Deployment.
        deployment: String,
        /// Cause.
        detail: String,
    },

    /// No `Authorization: Bearer` header.
    #[error("no API key")]
    MissingKey,
    /// A key that matches no stored key.
    #[error("invalid API key")]
    InvalidKey,
    /// A revoked key.
    #[error("key `{0}` is revoked")]
    KeyRevoked(String),
    /// An expired key.
    #[error("key `{0}` has expired")]
    KeyExpired(String),
    /// A key that may not use the model.
    #[error("key `{key}` may not use model `{model}`")]
    ModelNotAllowed {
        /// Key name.
        key: String,
        /// Model.
        model: String,
    },

    /// A `Content-Type` other than JSON.
    #[error("unsupported content type `{0}`")]
    UnsupportedMediaType(String),
    /// A body over the configured limit.
    #[error("body larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The client paused longer than the read timeout while sending its body.
    #[error("request body stalled for {0:?}")]
    BodyTimeout(Duration),
    /// The client's body could not be read (it hung up or sent garbage framing).
    #[error("cannot read request body: {0}")]
    BodyRead(String),
    /// A body that is not UTF-8.
    #[error("body is not valid UTF-8 (first bad byte at offset {0})")]
    InvalidUtf8(usize),
    /// A body that is not valid JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(serde_json::Error),
    /// Valid JSON that is not an object (an array, a string, …).
    #[error("body is not a JSON object")]
    NotAnObject,
    /// Valid JSON with a field of the wrong type.
    #[error("invalid request: {0}")]
    InvalidField(serde_json::Error),
    /// A Tollgate request header with a value it cannot use.
    #[error("invalid header {header}")]
    InvalidHeader {
        /// The header.
        header: &'static str,
        /// What it should hold.
        expected: &'static str,
    },
    /// A duration header beyond what the gateway allows.
    #[error("header `{header}` out of range")]
    HeaderOutOfRange {
        /// The header.
        header: &'static str,
        /// The longest allowed.
        max: Duration,
    },
    /// A required field is absent.
    #[error("missing required parameter `{0}`")]
    MissingField(&'static str),
    /// No deployment serves this model.
    #[error("model `{0}` not found")]
    ModelNotFound(String),
    /// No such route.
    #[error("unknown URL {method} {path}")]
    UnknownUrl {
        /// Method.
        method: String,
        /// Path.
        path: String,
    },
    /// A route that exists, with another method.
    #[error("method {0} not allowed here")]
    MethodNotAllowed(String),

    /// The upstream could not be reached.
    #[error("deployment `{deployment}` is unreachable: {detail}")]
    UpstreamUnreachable {
        /// Deployment.
        deployment: String,
        /// Cause, without secrets.
        detail: String,
    },
    /// The upstream did not answer in time.
    #[error("deployment `{deployment}` timed out")]
    UpstreamTimeout {
        /// Deployment.
        deployment: String,
    },
    /// The upstream answered something that is not a valid response.
    #[error("deployment `{deployment}` sent an invalid response: {detail}")]
    UpstreamInvalid {
        /// Deployment.
        deployment: String,
        /// What was wrong.
        detail: String,
    },
    /// The provider refused the deployment's credential.
    #[error("deployment `{deployment}` refused the gateway's credential ({status})")]
    UpstreamAuth {
        /// Deployment.
        deployment: String,
        /// 401 or 403.
        status: u16,
    },
    /// The upstream answered with a server error.
    #[error("deployment `{deployment}` answered {status}")]
    UpstreamStatus {
        /// Deployment.
        deployment: String,
        /// Its HTTP status.
        status: u16,
        /// Its `error.code` or `error.type`, when it sent one.
        code: Option<String>,
        /// Its message, when it sent one.
        message: Option<String>,
        /// Its `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },

    /// A limit refused the request.
    #[error("rate limited on {}", .0.scope)]
    RateLimited(Box<RateLimited>),
    /// A budget or an account's balance cannot take the request.
    #[error("refused by a spent budget or an empty account: {0:?}")]
    Money(Box<MoneyRefusal>),
    /// Every deployment of the model is cooling down after a provider 429.
    #[error("every route is cooling down for {retry_after:?}")]
    RoutesCooling {
        /// Until the first reopens.
        retry_after: Duration,
    },
    /// The request exceeds every deployment's whole provider token limit.
    #[error("request of {requested} tokens exceeds every route's limit of {limit}")]
    TooLargeForRoutes {
        /// The largest provider limit per minute among the routes.
        limit: u64,
        /// The request's estimated tokens.
        requested: u64,
    },
    /// The shared limit state (Redis) cannot be reached: refused rather
    /// than admitted unchecked.
    #[error("limit state unavailable")]
    LimitsUnavailable,
    /// The shared budget and credit state (Redis) cannot be reached: a
    /// request charged to a budget or an account is refused rather than
    /// let through unchecked (money never fails open).
    #[error("budget and credit state unavailable")]
    MoneyUnavailable,
    /// Redis lacks some of a request's money counts: the gateway seeds them
    /// from the database and decides again (a client hears this only as
    /// `money_unavailable`, when seeding keeps failing).
    #[error("money counts missing in Redis: {0:?}")]
    MoneyUnseeded(Vec<tollgate_store::redis::Unknown>),
    /// The shared idempotency records (Redis) cannot be reached: the
    /// request is not run, since it could not be run only once.
    #[error("idempotency records unavailable")]
    IdempotencyUnavailable,
    /// Every deployment of the model has its circuit open.
    #[error("every route is down for {retry_after:?}")]
    RoutesDown {
        /// Until the first circuit lets a probe through.
        retry_after: Duration,
    },
    /// An `Idempotency-Key` reused for a different request.
    #[error("idempotency key reused with a different body")]
    IdempotencyKeyReused,
    /// Money applies to the request but its model has no price.
    #[error("model `{0}` has no price")]
    UnpricedModel(String),

    /// The admin API is off (no admin key configured).
    #[error("admin API disabled")]
    AdminDisabled,
    /// A wrong or missing admin key.
    #[error("invalid admin key")]
    AdminUnauthorized,
    /// An admin request that makes no sense.
    #[error("{0}")]
    AdminBadRequest(String),
    /// An admin request naming something that does not exist.
    #[error("{0}")]
    AdminNotFound(String),
    /// An admin request that clashes with what exists.
    #[error("{0}")]
    AdminConflict(String),
}

impl Error {
    /// The decision-tree row for this error.
    pub fn to_api_error(&self) -> ApiError {
        let invalid = ApiError::invalid_request;
        match self {
            Error::Config(_)
            | Error::Store(_)
            | Error::Internal(_)
            | Error::Bind { .. }
            | Error::Serve(_)
            | Error::UpstreamClient { .. } => {
                // The detail may name files or hosts; it goes to the log, not the client.
                ApiError::new(500, ErrorType::Server, "internal_error", "The gateway hit an internal error; it has been logged.")
            }
            Error::RateLimited(r) => rate_limited(r),
            Error::Money(r) => money_refused(r),
            Error::RoutesCooling { retry_after } => ApiError::new(
                429,
                ErrorType::RateLimitExceeded,
                "upstream_rate_limited",
                format!(
                    "Every deployment serving this model is at its provider's rate limit. Please try again in {}.",
                    format_reset(*retry_after)
                ),
            )
            .with_retry_after(*retry_after)
            .with_field("scope", "upstream"),
            Error::TooLargeForRoutes { limit, requested } => ApiError::new(
                429,
                ErrorType::RateLimitExceeded,
                "request_too_large",
                format!(
                    "Request too large for the provider on tokens per min (TPM): limit {limit}, requested {requested}. It can never fit this limit, so waiting will not help: reduce the input or max_tokens."
                ),
            )
            .with_should_retry(false)
            .with_field("scope", "upstream")
            .with_field("limit", "tokens_per_minute"),
            Error::IdempotencyUnavailable => ApiError::new(
                503,
                ErrorType::Server,
                "idempotency_unavailable",
                "The gateway cannot reach its shared idempotency records, so it cannot promise to run this request only once. Please retry shortly.".to_owned(),
            )
            .with_should_retry(true),
            Error::MoneyUnavailable | Error::MoneyUnseeded(_) => ApiError::new(
                503,
                ErrorType::Server,
                "money_unavailable",
                "The gateway cannot reach its shared budget and credit state, so it cannot check what this request may spend. Please retry shortly.".to_owned(),
            )
            .with_should_retry(true),
            Error::LimitsUnavailable => ApiError::new(
                503,
                ErrorType::Server,
                "limits_unavailable",
                "The gateway cannot reach its shared limit state, so it cannot check this request's limits. Please retry shortly.".to_owned(),
            )
            .with_should_retry(true),
            Error::RoutesDown { retry_after } => ApiError::new(
                503,
                ErrorType::Upstream,
                "upstream_unavailable",
                format!(
                    "Every deployment serving this model is failing and has been taken out of rotation. Please try again in {}.",
                    format_reset(*retry_after)
                ),
            )
            .with_retry_after(*retry_after),
            Error::IdempotencyKeyReused => invalid(
                422,
                "idempotency_key_reused",
                "This Idempotency-Key was already used for a different request (another endpoint or body). Use a new key for a new request.".to_owned(),
            ),
            Error::UnpricedModel(model) => invalid(
                400,
                "model_not_priced",
                format!("The model `{model}` has no price in the gateway's price table, so its spend cannot be counted against a budget or account. Ask the operator to price it."),
            )
            .with_param("model"),
            Error::MissingKey => ApiError::authentication(
                "invalid_api_key",
                "You didn't provide an API key. Send it in an Authorization header using Bearer auth (Authorization: Bearer tg-...).",
            ),
            Error::InvalidKey => ApiError::authentication("invalid_api_key", "Incorrect API key provided."),
            Error::KeyRevoked(name) => ApiError::authentication("key_revoked", format!("The API key '{name}' has been revoked.")),
            Error::KeyExpired(name) => ApiError::authentication("key_expired", format!("The API key '{name}' has expired.")),
            Error::ModelNotAllowed { key, model } => {
                ApiError::permission("model_not_allowed", format!("The API key '{key}' is not allowed to use the model `{model}`."))
                    .with_param("model")
            }
            Error::UnsupportedMediaType(ct) => invalid(
                415,
                "unsupported_media_type",
                format!("Unsupported Content-Type `{ct}`: send the body as JSON with Content-Type: application/json."),
            ),
            Error::BodyTooLarge { limit } => {
                invalid(413, "request_too_large", format!("The request body exceeds the gateway's limit of {limit} bytes."))
            }
            Error::BodyTimeout(waited) => invalid(
                408,
                "request_timeout",
                format!("The request body stopped arriving: nothing came for {}.", humantime::format_duration(*waited)),
            )
            // The request itself may be fine: sent again, it may arrive in time.
            .with_should_retry(true),
            Error::BodyRead(detail) => invalid(400, "invalid_body", format!("The request body could not be read: {detail}.")),
            Error::InvalidUtf8(at) => {
                invalid(400, "invalid_encoding", format!("The request body is not valid UTF-8 (invalid byte at offset {at})."))
            }
            Error::InvalidJson(e) => invalid(400, "invalid_json", format!("We could not parse the JSON body of your request: {e}.")),
            Error::NotAnObject => invalid(400, "invalid_json", "The request body must be a JSON object.".into()),
            Error::InvalidField(e) => invalid(400, "invalid_value", format!("Invalid request body: {e}.")),
            Error::InvalidHeader { header, expected } => {
                invalid(400, "invalid_header", format!("The header `{header}` must be {expected}."))
            }
            Error::HeaderOutOfRange { header, max } => invalid(
                400,
                "invalid_header",
                format!("The header `{header}` must be a positive duration of at most {}.", humantime::format_duration(*max)),
            ),
            Error::MissingField(field) => {
                invalid(400, "missing_required_parameter", format!("Missing required parameter: '{field}'.")).with_param(*field)
            }
            Error::ModelNotFound(model) => invalid(
                404,
                "model_not_found",
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
            .with_param("model"),
            Error::UnknownUrl { method, path } => invalid(404, "unknown_url", format!("Invalid URL ({method} {path}).")),
            Error::MethodNotAllowed(method) => invalid(405, "method_not_allowed", format!("Method {method} is not allowed on this URL.")),
            Error::UpstreamUnreachable { deployment, .. } => ApiError::new(
                502,
                ErrorType::Upstream,
                "upstream_unreachable",
                format!("The connection to the upstream deployment '{deployment}' failed."),
            ),
            Error::UpstreamTimeout { deployment } => ApiError::new(
                504,
                ErrorType::UpstreamTimeout,
                "upstream_timeout",
                format!("The upstream deployment '{deployment}' did not answer in time."),
            ),
            Error::UpstreamInvalid { deployment, detail } => ApiError::new(
                502,
                ErrorType::Upstream,
                "upstream_invalid_response",
                format!("The upstream deployment '{deployment}' sent an invalid response ({detail})."),
            ),
            Error::UpstreamAuth { deployment, status } => ApiError::new(
                502,
                ErrorType::Upstream,
                "upstream_auth_failed",
                format!("The upstream deployment '{deployment}' refused the gateway's provider credential ({status}); an operator must fix the deployment's key."),
            )
            .with_should_retry(false),
            Error::UpstreamStatus { deployment, status, code, message, retry_after } => {
                let http_status = if matches!(status, 503 | 529) { 503 } else { 502 };
                let code = code.clone().unwrap_or_else(|| "upstream_error".into());
                let detail = message.as_deref().map_or(String::new(), |m| format!(": {m}"));
                let e = ApiError::new(
                    http_status,
                    ErrorType::Upstream,
                    code,
                    format!("The upstream deployment '{deployment}' answered {status}{detail}"),
                );
                match retry_after {
                    Some(d) => e.with_retry_after(*d),
                    None => e,
                }
            }
            Error::AdminDisabled => ApiError::permission(
                "admin_disabled",
                "The admin API is disabled: set the admin key environment variable (TOLLGATE_ADMIN_KEY by default) and restart.",
            ),
            Error::AdminUnauthorized => ApiError::authentication("invalid_admin_key", "Incorrect or missing admin key."),
            Error::AdminBadRequest(message) => invalid(400, "invalid_request", message.clone()),
            Error::AdminNotFound(message) => invalid(404, "not_found", message.clone()),
            Error::AdminConflict(message) => invalid(409, "conflict", message.clone()),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        e.to_api_error()
    }
}

/// The 429 of a limit: which scope and limit refused, what was used and
/// asked, and when this very request would be admitted.
fn rate_limited(r: &RateLimited) -> ApiError {
    let f = &r.refusal;
    let (scope, what) = (&r.scope, f.kind.describe());
    let (limit, used, requested) = (f.limit, f.used, f.requested);
    let e = match f.why {
        RefusalKind::Wait(wait) => ApiError::new(
            429,
            ErrorType::RateLimitExceeded,
            "rate_limit_exceeded",
            format!(
                "Rate limit reached for {scope} on {what}: limit {limit}, used {used}, requested {requested}. Please try again in {}.",
                format_reset(wait)
            ),
        )
        .with_retry_after(wait),
        RefusalKind::DailyCap(until) => {
            let cap = if f.kind.dimension() == Dimension::Tokens { "token" } else { "request" };
            ApiError::new(
                429,
                ErrorType::RateLimitExceeded,
                "daily_token_cap",
                format!(
                    "Daily {cap} cap reached for {scope} on {what}: limit {limit}, used {used}, requested {requested}. It resets at 00:00 UTC, in {}.",
                    format_reset(until)
                ),
            )
            .with_retry_after(until)
            .with_should_retry(false)
        }
        RefusalKind::NeverFits => ApiError::new(
            429,
            ErrorType::RateLimitExceeded,
            "request_too_large",
            format!(
                "Request too large for {scope} on {what}: limit {limit}, requested {requested}. It can never fit this limit, so waiting will not help: reduce the input or max_tokens."
            ),
        )
        .with_should_retry(false),
    };
    let e = e
        .with_field("scope", scope.as_str())
        .with_field("limit", f.kind.as_str());
    match f.retry_after() {
        Some(after) => e.with_field(
            "retry_after_seconds",
            after.as_nanos().div_ceil(1_000_000) as f64 / 1000.0,
        ),
        None => e,
    }
}

fn money_refused(r: &MoneyRefusal) -> ApiError {
    match r {
        MoneyRefusal::Budget {
            scope,
            window,
            cap,
            spent,
            requested,
            resets_at,
            resets_in,
        } => {
            let (cap, spent, requested) = (Usd(*cap), Usd(*spent), Usd(*requested));
            let when = match resets_at {
                Some(at) => format!("It resets at {}.", format_utc(*at)),
                None => "It is a lifetime budget and does not reset.".to_owned(),
            };
            let e = ApiError::new(
                429,
                ErrorType::BudgetExceeded,
                "budget_exceeded",
                format!(
                    "Budget exceeded for {scope}: the {window} budget of ${cap} is used up (spent ${spent}, this request needs up to ${requested}). {when} Raise the budget or wait; retrying will not help."
                ),
            )
            .with_should_retry(false)
            .with_field("scope", &**scope)
            .with_field("window", window.as_str())
            .with_field("cap_usd", cap.to_string())
            .with_field("spent_usd", spent.to_string())
            .with_field("requested_usd", requested.to_string());
            match (resets_at, resets_in) {
                (Some(at), Some(wait)) => e
                    .with_field("resets_at", format_utc(*at))
                    .with_retry_after(*wait),
                _ => e.with_field("resets_at", serde_json::Value::Null),
            }
        }
        MoneyRefusal::Credits {
            account,
            balance,
            held,
            requested,
        } => {
            let (balance_usd, held_usd, requested_usd) =
                (Usd(*balance), Usd(*held), Usd(*requested));
            ApiError::new(
                402,
                ErrorType::InsufficientCredits,
                "insufficient_credits",
                format!(
                    "Insufficient credits in account '{account}': balance ${balance_usd}, ${held_usd} held for requests in flight; this request needs up to ${requested_usd}. Top up the account to continue."
                ),
            )
            .with_should_retry(false)
            .with_field("account", &**account)
            .with_field("balance_usd", balance_usd.to_string())
            .with_field("held_usd", held_usd.to_string())
            .with_field("requested_usd", requested_usd.to_string())
        }
    }
}

/// Renders an [`ApiError`] as an HTTP response with DESIGN §1's headers.
pub fn api_error_response(e: &ApiError) -> Response {
    let body = serde_json::to_vec(&e.to_body()).unwrap_or_default();
    let status =
        http::StatusCode::from_u16(e.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, body).into_response();
    write_retry_advice(resp.headers_mut(), e.should_retry, e.retry_after);
    resp
}

/// A JSON content type, `x-should-retry`, and, when known, `Retry-After`
/// (whole seconds, rounded up) with `retry-after-ms`: what the OpenAI SDKs
/// read to decide whether and when to retry.
pub fn write_retry_advice(
    h: &mut http::HeaderMap,
    should_retry: bool,
    retry_after: Option<Duration>,
) {
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        names::SHOULD_RETRY.clone(),
        HeaderValue::from_static(if should_retry { "true" } else { "false" }),
    );
    if let Some(after) = retry_after {
        let secs = after.as_nanos().div_ceil(1_000_000_000);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            h.insert(RETRY_AFTER, v);
        }
        // Rounded up: a client that comes back after exactly this is admitted.
        let ms = after.as_nanos().div_ceil(1_000_000);
        if let Ok(v) = HeaderValue::from_str(&ms.to_string()) {
            h.insert(names::RETRY_AFTER_MS.clone(), v);
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if matches!(
            self,
            Error::Config(_)
                | Error::Store(_)
                | Error::Internal(_)
                | Error::Bind { .. }
                | Error::Serve(_)
                | Error::UpstreamClient { .. }
        ) {
            tracing::error!(error = %self, "internal error while serving a request");
        }
        api_error_response(&self.to_api_error())
    }
}
