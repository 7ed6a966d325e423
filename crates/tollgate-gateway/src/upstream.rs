//! Calling a deployment: one pooled HTTP client per deployment, the request
//! forwarded as the client sent it (original bytes), and the answer sorted
//! into success, a caller error to pass through, or an upstream failure.

use crate::config::{DeploymentConfig, Provider};
use crate::error::Error;
use crate::header_names as names;
use crate::headroom::{Headroom, Reservation};
use crate::transport::{BodyError, SendError, Transport, UpstreamBody};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::limits::{Cost, LimitSet};

/// The OpenAI endpoints the gateway forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/chat/completions`.
    ChatCompletions,
    /// `/completions`.
    Completions,
    /// `/embeddings`.
    Embeddings,
}

impl Endpoint {
    /// Path below the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }
}

/// One request as each deployment of a pool is sent it.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The body, with the model the pool serves.
    pub body: Bytes,
    /// Client headers meant for the provider (`x-mock-*`).
    pub passthrough: &'a HeaderMap,
    /// What it costs against a deployment's provider limits.
    pub cost: Cost,
    /// The request's own timeouts, overriding the deployment's.
    pub timeouts: Timeouts,
}

/// Timeouts a request sets for itself (`x-tollgate-timeout`,
/// `x-tollgate-first-byte-timeout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// Time to the response's headers.
    pub first_byte: Option<Duration>,
    /// The whole call, a stream's body included.
    pub total: Option<Duration>,
}

/// A provider key and the header it goes in; never printed.
#[derive(Clone)]
pub struct ProviderKey(http::HeaderName, HeaderValue);

impl std::fmt::Debug for ProviderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProviderKey(<redacted>)")
    }
}

/// The Azure OpenAI data-plane API version used when a deployment names none.
pub const AZURE_API_VERSION: &str = "2024-10-21";

/// One upstream endpoint with its credential and connection pool.
#[derive(Debug)]
pub struct Deployment {
    /// Its configured name.
    pub name: Arc<str>,
    /// Models it serves.
    pub models: Vec<String>,
    /// Endpoint URLs, parsed once: a request never re-parses its URL.
    urls: [http::Uri; 3],
    key: Option<ProviderKey>,
    transport: Transport,
    timeout: Duration,
    first_byte_timeout: Option<Duration>,
    /// Cool-downs and circuit state, shared by every pool it serves in.
    pub health: crate::routing::Health,
    /// Its provider limits and what is sent against them.
    pub headroom: Headroom,
}

/// What an upstream call produced.
#[derive(Debug)]
pub enum Outcome {
    /// A 2xx; the body is still to be read or streamed.
    Success(http::Response<UpstreamBody>),
    /// A 4xx other than 429: the caller's fault, passed through unchanged.
    CallerError {
        /// Status.
        status: StatusCode,
        /// Content type.
        content_type: Option<HeaderValue>,
        /// Body, as sent.
        body: Bytes,
    },
    /// A 429 from the provider: passed through with its retry advice.
    Throttled {
        /// Body, as sent.
        body: Bytes,
        /// `Retry-After` / `retry-after-ms`, when sent.
        retry_after: Option<Duration>,
        /// `insufficient_quota`: a billing problem that never clears with time.
        quota_exhausted: bool,
    },
}

/// The `retry-after-ms` or `Retry-After` (seconds) of a response.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let ms = headers
        .get(&names::RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok()?.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0));
    ms.or_else(|| {
        headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
    })
}

/// `error.code` (or `error.type`) and `error.message` of an OpenAI- or
/// Anthropic-shaped error body.
fn error_fields(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    let e = &v["error"];
    let code = e["code"]
        .as_str()
        .or_else(|| e["type"].as_str())
        .map(str::to_owned);
    let message = e["message"].as_str().map(|m| m.chars().take(300).collect());
    (code, message)
}

impl Deployment {
    /// Builds the deployment's client; the key comes from `api_key`, read
    /// from the environment by the caller.
    pub fn new(
        config: &DeploymentConfig,
        base_url: &str,
        api_key: Option<String>,
        serving_threads: usize,
    ) -> Result<Self, Error> {
        let client_err = |detail: String| Error::UpstreamClient {
            deployment: config.name.clone(),
            detail,
        };
        let azure = config.provider == Provider::Azure;
        let key = api_key
            .map(|k| {
                // Azure takes the bare key in `api-key`; the others a bearer token.
                let (name, text) = if azure {
                    (http::HeaderName::from_static("api-key"), k)
                } else {
                    (AUTHORIZATION, format!("Bearer {k}"))
                };
                let mut v = HeaderValue::from_str(&text).map_err(|_| {
                    client_err("the API key has characters not allowed in a header".into())
                })?;
                v.set_sensitive(true);
                Ok::<_, Error>(ProviderKey(name, v))
            })
            .transpose()?;
        let query = if azure {
            let version = config.api_version.as_deref().unwrap_or(AZURE_API_VERSION);
            format!("?api-version={version}")
        } else {
            String::new()
        };
        let base = base_url.trim_end_matches('/');
        let url = |e: Endpoint| {
            let url = format!("{base}{}{query}", e.path());
            match url.parse::<http::Uri>() {
                Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {
                    Ok(u)
                }
                Ok(_) => Err(client_err(format!(
                    "base_url `{base_url}` is not an http:// or https:// URL with a host"
                ))),
                Err(err) => Err(client_err(format!(
                    "base_url `{base_url}` is not a URL: {err}"
                ))),
            }
        };
        let urls = [
            url(Endpoint::ChatCompletions)?,
            url(Endpoint::Completions)?,
            url(Endpoint::Embeddings)?,
        ];
        let transport = Transport::new(&urls[0], config.connect_timeout, serving_threads + 1)
            .map_err(client_err)?;
        Ok(Self {
            name: config.name.as_str().into(),
            models: config.models.clone(),
            urls,
            key,
            transport,
            timeout: config.timeout,
            first_byte_timeout: config.first_byte_timeout,
            health: crate::routing::Health::default(),
            headroom: Headroom::new(LimitSet {
                rpm: config.rpm,
                tpm: config.tpm,
                ..LimitSet::default()
            }),
        })
    }

    /// The default base URL of a provider.
    pub fn default_base_url(provider: Provider) -> Option<&'static str> {
        match provider {
            Provider::Openai => Some("https://api.openai.com/v1"),
            Provider::OpenaiCompatible | Provider::Azure | Provider::Mock => None,
        }
    }

    /// Sends `call`, charged as `reservation` on this deployment's
    /// headroom until the answer's rate-limit headers are read.
    pub async fn send(
        &self,
        call: &Call<'_>,
        reservation: Reservation<'_>,
        now: impl Fn() -> u64,
    ) -> Result<Outcome, Error> {
        let mut req = http::Request::post(self.urls[call.endpoint as usize].clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(call.body.clone())
            .map_err(|e| self.unreachable(e.to_string()))?;
        let headers = req.headers_mut();
        if let Some(key) = &self.key {
            headers.insert(key.0.clone(), key.1.clone());
        }
        for (name, value) in call.passthrough {
            headers.append(name, value.clone());
        }
        let sent = tokio::time::Instant::now();
        let deadline = sent + call.timeouts.total.unwrap_or(self.timeout);
        let head_by = match call.timeouts.first_byte.or(self.first_byte_timeout) {
            Some(limit) => deadline.min(sent + limit),
            None => deadline,
        };
        let thread = crate::server::serving_thread();
        let resp = match self.transport.send(thread, req, head_by, deadline).await {
            Ok(resp) => resp,
            Err(SendError::Timeout) => return Err(self.timed_out()),
            Err(SendError::Unreachable(detail)) => return Err(self.unreachable(detail)),
        };
        crate::metrics::first_byte(&self.name, sent.elapsed());
        self.headroom.observe(resp.headers(), now(), reservation);
        let status = resp.status();
        if status.is_success() {
            return Ok(Outcome::Success(resp));
        }
        let (head, body) = resp.into_parts();
        let headers = head.headers;
        let body = body.bytes().await.map_err(|e| self.body_error(e))?;
        let (code, message) = error_fields(&body);
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Ok(Outcome::Throttled {
                quota_exhausted: code.as_deref() == Some("insufficient_quota"),
                retry_after: retry_after(&headers),
                body,
            });
        }
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            // The provider refused the gateway's own credential: the client's
            // key is fine, so this must not reach it as a 401 of its own.
            return Err(Error::UpstreamAuth {
                deployment: self.name.to_string(),
                status: status.as_u16(),
            });
        }
        if status.is_client_error() {
            return Ok(Outcome::CallerError {
                status,
                content_type: headers.get(CONTENT_TYPE).cloned(),
                body,
            });
        }
        Err(Error::UpstreamStatus {
            deployment: self.name.to_string(),
            status: status.as_u16(),
            code,
            message,
            retry_after: retry_after(&headers),
        })
    }

    /// A response body that could not be read to its end.
    pub fn body_error(&self, e: BodyError) -> Error {
        match e {
            BodyError::Timeout => self.timed_out(),
            BodyError::Broken(detail) => Error::UpstreamInvalid {
                deployment: self.name.to_string(),
                detail,
            },
        }
    }

    fn timed_out(&self) -> Error {
        Error::UpstreamTimeout {
            deployment: self.name.to_string(),
        }
    }

    fn unreachable(&self, detail: String) -> Error {
        Error::UpstreamUnreachable {
            deployment: self.name.to_string(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(base_url: &str) -> Result<Deployment, Error> {
        let config: DeploymentConfig =
            toml::from_str("name = \"d\"\nprovider = \"openai_compatible\"\nmodels = [\"m\"]\n")
                .expect("config");
        let _ = rustls::crypto::ring::default_provider().install_default();
        Deployment::new(&config, base_url, None, 1)
    }

    #[test]
    fn a_base_url_must_be_an_http_or_https_url_with_a_host() {
        for bad in ["not a url", "ftp://files.example/v1", "/v1", "http://"] {
            let err = deployment(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("base_url `{bad}`")), "{bad}: {err}");
        }
        for good in ["http://127.0.0.1:1/v1", "https://api.openai.com/v1/"] {
            let d = deployment(good).expect(good);
            assert_eq!(d.urls[0].path(), "/v1/chat/completions", "{good}");
        }
    }
}
