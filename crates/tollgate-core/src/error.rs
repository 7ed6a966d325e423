//! The error taxonomy of DESIGN §1: every "no" the gateway can say, with the
//! status, `error.type`, `error.code`, retry advice and body it carries.
//!
//! An [`ApiError`] is data, not HTTP: the gateway turns it into a response in
//! one place, and the client library reads the same vocabulary back.

use serde_json::{Map, Value};
use std::borrow::Cow;
use std::time::Duration;

/// The `error.type` of an OpenAI-shaped error body; each variant fixes a row
/// of the decision tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// Too fast for a rolling limit or over a calendar cap (429).
    RateLimitExceeded,
    /// A spend cap of a scope is used up (429, never retried).
    BudgetExceeded,
    /// A prepaid balance cannot cover the request (402).
    InsufficientCredits,
    /// The caller sent something wrong (400, 404, 405, 413, 415, 422).
    InvalidRequest,
    /// No valid credential (401).
    Authentication,
    /// A valid credential that may not do this (403).
    Permission,
    /// Every upstream route failed (502, 503).
    Upstream,
    /// Upstream did not answer in time (504).
    UpstreamTimeout,
    /// A fault of the gateway itself (500).
    Server,
}

impl ErrorType {
    /// The wire name, as it appears in `error.type`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RateLimitExceeded => "rate_limit_exceeded",
            Self::BudgetExceeded => "budget_exceeded",
            Self::InsufficientCredits => "insufficient_credits",
            Self::InvalidRequest => "invalid_request_error",
            Self::Authentication => "authentication_error",
            Self::Permission => "permission_error",
            Self::Upstream => "upstream_error",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::Server => "server_error",
        }
    }

    /// Whether a client may retry this kind of error at all; an individual
    /// error may still say otherwise (a request that can never fit).
    pub const fn retryable(self) -> bool {
        match self {
            Self::RateLimitExceeded | Self::Upstream | Self::UpstreamTimeout | Self::Server => true,
            Self::BudgetExceeded
            | Self::InsufficientCredits
            | Self::InvalidRequest
            | Self::Authentication
            | Self::Permission => false,
        }
    }
}

/// One refusal: enough for a client to pick its reaction without parsing prose.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// `error.type`.
    pub error_type: ErrorType,
    /// `error.code`: a stable machine-readable reason.
    pub code: Cow<'static, str>,
    /// `error.message`: for humans.
    pub message: String,
    /// `error.param`: the request field at fault, if one is.
    pub param: Option<Cow<'static, str>>,
    /// When the client may come back; becomes `Retry-After` and `retry-after-ms`.
    pub retry_after: Option<Duration>,
    /// Becomes `x-should-retry`.
    pub should_retry: bool,
    /// Extra body fields (`scope`, `limit`, `retry_after_seconds`, …).
    pub extra: Map<String, Value>,
}

impl ApiError {
    /// A refusal of `error_type` with the type's default retry advice.
    pub fn new(
        status: u16,
        error_type: ErrorType,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            error_type,
            code: code.into(),
            message: message.into(),
            param: None,
            retry_after: None,
            should_retry: error_type.retryable(),
            extra: Map::new(),
        }
    }

    /// A caller error (`invalid_request_error`), never retried.
    pub fn invalid_request(
        status: u16,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(status, ErrorType::InvalidRequest, code, message)
    }

    /// 401 `authentication_error`.
    pub fn authentication(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(401, ErrorType::Authentication, code, message)
    }

    /// 403 `permission_error`.
    pub fn permission(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(403, ErrorType::Permission, code, message)
    }

    /// Names the request field at fault.
    pub fn with_param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Says when to come back.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Overrides the type's default retry advice.
    pub fn with_should_retry(mut self, should_retry: bool) -> Self {
        self.should_retry = should_retry;
        self
    }

    /// Adds an extra body field.
    pub fn with_field(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// The OpenAI-shaped body: `{"error": {"message", "type", "code", "param", …}}`.
    pub fn to_body(&self) -> Value {
        let mut error = Map::with_capacity(4 + self.extra.len());
        error.insert("message".into(), Value::String(self.message.clone()));
        error.insert("type".into(), self.error_type.as_str().into());
        error.insert("code".into(), Value::String(self.code.to_string()));
        error.insert(
            "param".into(),
            self.param
                .as_ref()
                .map_or(Value::Null, |p| Value::String(p.to_string())),
        );
        for (k, v) in &self.extra {
            error.insert(k.clone(), v.clone());
        }
        let mut body = Map::with_capacity(1);
        body.insert("error".into(), Value::Object(error));
        Value::Object(body)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({}): {}",
            self.status,
            self.error_type.as_str(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape_with_extras() {
        let e = ApiError::new(
            429,
            ErrorType::RateLimitExceeded,
            "rate_limit_exceeded",
            "slow down",
        )
        .with_field("scope", "key:prod-web");
        let body = e.to_body();
        assert_eq!(body["error"]["type"], "rate_limit_exceeded");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["param"], Value::Null);
        assert_eq!(body["error"]["scope"], "key:prod-web");
        assert!(e.should_retry);
    }

    #[test]
    fn caller_errors_are_not_retryable() {
        let e = ApiError::invalid_request(400, "invalid_json", "bad");
        assert!(!e.should_retry);
        assert!(!ApiError::authentication("invalid_api_key", "no").should_retry);
    }
}
