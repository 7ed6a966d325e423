//! The header names the gateway reads and writes, parsed once at compile
//! time: a `&str` name is validated and lower-cased on every lookup or
//! insert, and a request passes through about fifteen of them.

use http::HeaderName;

/// The request id, from the client or made up; echoed on every answer.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The provider's own request id, relayed.
pub static UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
/// Whether the OpenAI SDKs should retry (DESIGN §1).
pub static SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// Milliseconds until a refused request would be admitted.
pub static RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// Makes a request execute at most once per key (the `idempotency` module).
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The end user, when the body's `user` field does not name one.
pub static USER: HeaderName = HeaderName::from_static("x-tollgate-user");
/// How long a request may queue for its limits.
pub static MAX_WAIT: HeaderName = HeaderName::from_static("x-tollgate-max-wait");
/// The request's own bound on the upstream's first byte.
pub static FIRST_BYTE_TIMEOUT: HeaderName =
    HeaderName::from_static("x-tollgate-first-byte-timeout");
/// The request's own bound on the whole upstream call.
pub static TIMEOUT: HeaderName = HeaderName::from_static("x-tollgate-timeout");
/// The model that answered.
pub static MODEL: HeaderName = HeaderName::from_static("x-tollgate-model");
/// The deployment that answered.
pub static DEPLOYMENT: HeaderName = HeaderName::from_static("x-tollgate-deployment");
/// The fallback taken, if any.
pub static FALLBACK: HeaderName = HeaderName::from_static("x-tollgate-fallback");
/// Upstream calls made for the request.
pub static ATTEMPTS: HeaderName = HeaderName::from_static("x-tollgate-attempts");
/// This request's cost.
pub static COST_USD: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");
/// What the tightest budget has left.
pub static BUDGET_REMAINING_USD: HeaderName =
    HeaderName::from_static("x-tollgate-budget-remaining-usd");
/// What the account has left.
pub static CREDITS_REMAINING_USD: HeaderName =
    HeaderName::from_static("x-tollgate-credits-remaining-usd");
/// OpenAI's request-limit triple: limit, remaining, reset.
pub static RATELIMIT_REQUESTS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
/// OpenAI's token-limit triple: limit, remaining, reset.
pub static RATELIMIT_TOKENS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
