//! What to do about an answer: the decision tree of DESIGN §1, read back
//! from OpenAI's, Anthropic's and Tollgate's status codes, headers and error
//! bodies. Usable on its own: `classify(status, &headers, &body, now)`.

use http::HeaderMap;
use serde::Deserialize;
use std::time::{Duration, SystemTime};

/// The reaction an answer calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Success: nothing to do.
    Done,
    /// Retry after exactly this long: the server said when.
    RetryAfter(Duration),
    /// Retry with jittered exponential backoff: the server did not say when.
    Backoff,
    /// A spend cap is used up: stop and tell a human.
    StopBudget {
        /// The scope that hit its cap (`team:search`), when named.
        scope: Option<String>,
        /// When the budget window resets; `None` for lifetime budgets.
        resets_in: Option<Duration>,
    },
    /// A prepaid balance (or the provider's quota) cannot pay: top up.
    TopUp {
        /// The account to top up, when named.
        account: Option<String>,
    },
    /// A daily cap: nothing before the next reset, this long from now.
    DailyCapUntil(Duration),
    /// Retrying cannot help (a caller error, a credential problem, a request
    /// larger than the limit itself).
    FailFast,
}

impl Disposition {
    /// Whether a client may send the same request again on its own.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Disposition::RetryAfter(_) | Disposition::Backoff)
    }
}

/// The fields of an error body that decide anything, in OpenAI's shape
/// (`{"error": {...}}`, Tollgate adds `scope` and `account`) or Anthropic's
/// (`{"type": "error", "error": {"type": ...}}`).
#[derive(Debug, Default, Deserialize)]
struct Envelope {
    #[serde(default)]
    error: Option<ErrorFields>,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorFields {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    account: Option<String>,
}

impl ErrorFields {
    fn code(&self) -> Option<&str> {
        self.code.as_ref().and_then(|c| c.as_str())
    }

    fn is(&self, name: &str) -> bool {
        self.kind.as_deref() == Some(name) || self.code() == Some(name)
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// The server's own advice on when to come back: `retry-after-ms`, else
/// `Retry-After` in seconds or as an HTTP date (relative to `now`).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let ms = header(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok());
    if let Some(ms) = ms.filter(|ms| ms.is_finite() && *ms >= 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = header(headers, "retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// The server's verdict in `x-should-retry`, if it gave one.
fn should_retry(headers: &HeaderMap) -> Option<bool> {
    match header(headers, "x-should-retry")? {
        v if v.eq_ignore_ascii_case("true") => Some(true),
        v if v.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// Classifies one answer. `now` is the wall clock, for `Retry-After` dates.
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Disposition {
    if (200..300).contains(&status) {
        return Disposition::Done;
    }
    let error = serde_json::from_slice::<Envelope>(body)
        .ok()
        .and_then(|e| e.error)
        .unwrap_or_default();
    let after = retry_after(headers, now);

    // Money first: no header turns these into a retry.
    if error.is("budget_exceeded") {
        return Disposition::StopBudget {
            scope: error.scope,
            resets_in: after,
        };
    }
    if status == 402 || error.is("insufficient_credits") || error.is("insufficient_quota") {
        return Disposition::TopUp {
            account: error.account,
        };
    }
    if error.code() == Some("daily_token_cap") {
        return match after {
            Some(d) => Disposition::DailyCapUntil(d),
            None => Disposition::FailFast,
        };
    }

    let retry =
        |after: Option<Duration>| after.map_or(Disposition::Backoff, Disposition::RetryAfter);
    match should_retry(headers) {
        Some(false) => return Disposition::FailFast,
        Some(true) => return retry(after),
        None => {}
    }
    let too_large = error.code() == Some("request_too_large")
        || error
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("Request too large"));
    match status {
        429 if too_large => Disposition::FailFast,
        // 529 is Anthropic's "overloaded"; 408/409 are retried by the SDKs.
        408 | 409 | 429 | 500..=599 => retry(after),
        _ => Disposition::FailFast,
    }
}
