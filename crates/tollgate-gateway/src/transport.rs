//! The HTTP client that carries calls to a deployment: hyper's connections
//! with rustls, pooled by [`ConnectionPool`]. reqwest, built on hyper-util's
//! pooled client, parsed every call's URL twice more and ran a redirect
//! policy on it: 28k instructions a call, 15 % of the gateway's own work
//! on a short chat request. reqwest still carries the calls of a
//! deployment that the environment sends through an HTTP proxy
//! (`HTTPS_PROXY`, `NO_PROXY`, …), which the direct client does not speak.

use crate::connection_pool::{ConnectionPool, Lease};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Collected, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls_platform_verifier::ConfigVerifierExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// How direct connections are opened: TCP, then TLS for https.
pub type Connector = ConnectWithin<hyper_rustls::HttpsConnector<HttpConnector>>;

/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// How a deployment's calls travel.
#[derive(Debug)]
pub enum Transport {
    /// Straight to the provider, one pool per serving thread (and one for
    /// the rest): a pooled connection's task runs on the thread that opened
    /// it, so a call made from another thread would wake that one twice.
    Direct(Box<[Arc<ConnectionPool>]>),
    /// Through the proxy the environment names for the deployment's URL.
    Proxied(reqwest::Client),
}

/// Why a call got no response head.
#[derive(Debug)]
pub enum SendError {
    /// The deadline passed first.
    Timeout,
    /// No connection, or it broke before the response head.
    Unreachable(String),
}

/// Why a response body could not be read to its end.
#[derive(Debug)]
pub enum BodyError {
    /// The call's deadline passed.
    Timeout,
    /// The connection broke or the body was not valid HTTP.
    Broken(String),
}

impl Transport {
    /// A transport for calls to `url`: proxied when the environment says
    /// so for it, else direct with `pools` connection pools.
    pub fn new(url: &http::Uri, connect_timeout: Duration, pools: usize) -> Result<Self, String> {
        let proxy = hyper_util::client::proxy::matcher::Matcher::from_env();
        if proxy.intercept(url).is_some() {
            return reqwest::Client::builder()
                .connect_timeout(connect_timeout)
                .pool_max_idle_per_host(1024)
                .pool_idle_timeout(POOL_IDLE)
                .tcp_nodelay(true)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map(Self::Proxied)
                .map_err(|e| e.to_string());
        }
        let tls = rustls::ClientConfig::with_platform_verifier().map_err(|e| e.to_string())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = ConnectWithin {
            inner: hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http),
            limit: connect_timeout,
        };
        let pools = (0..pools.max(1))
            .map(|_| Arc::new(ConnectionPool::new(connector.clone(), url, POOL_IDLE)))
            .collect();
        Ok(Self::Direct(pools))
    }

    /// Sends `request` on the pool of serving thread `thread`; the answer's
    /// head must arrive before `head_by`, its body before `deadline`.
    pub async fn send(
        &self,
        thread: usize,
        request: Request<Bytes>,
        head_by: Instant,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let timed_out = |_| SendError::Timeout;
        match self {
            Self::Direct(pools) => {
                let pool = &pools[thread % pools.len()];
                let call = pool.send(request.map(Full::new));
                let (resp, lease) = tokio::time::timeout_at(head_by, call)
                    .await
                    .map_err(timed_out)?
                    .map_err(|e| request_error(&*e))?;
                Ok(resp.map(|body| UpstreamBody::new(Inner::Direct(body, lease), deadline)))
            }
            Self::Proxied(client) => {
                let request = reqwest::Request::try_from(request.map(reqwest::Body::from))
                    .map_err(|e| SendError::Unreachable(error_chain(&e.without_url())))?;
                let resp = tokio::time::timeout_at(head_by, client.execute(request))
                    .await
                    .map_err(timed_out)?
                    .map_err(|e| request_error(&e.without_url()))?;
                Ok(Response::from(resp)
                    .map(|body| UpstreamBody::new(Inner::Proxied(body), deadline)))
            }
        }
    }
}

/// A connector whose connections must be up, TLS handshake included,
/// within `limit` (hyper's own connect timeout stops at TCP).
#[derive(Debug, Clone)]
pub struct ConnectWithin<C> {
    inner: C,
    limit: Duration,
}

/// Any error a connection can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower_service::Service<http::Uri> for ConnectWithin<C>
where
    C: tower_service::Service<http::Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting took longer than connect_timeout",
                )
                .into()),
            }
        })
    }
}

/// A connect that timed out is a timeout; anything else before the
/// response head means the deployment could not be reached.
fn request_error(e: &(dyn std::error::Error + 'static)) -> SendError {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return SendError::Timeout;
        }
        cause = c.source();
    }
    SendError::Unreachable(error_chain(e))
}

/// An error with its causes, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

enum Inner {
    /// With the connection to give back to its pool at the body's end.
    Direct(Incoming, Option<Lease>),
    Proxied(reqwest::Body),
}

/// A response body as it arrives, cut off at its call's deadline.
pub struct UpstreamBody {
    inner: Inner,
    deadline: Pin<Box<Sleep>>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamBody")
    }
}

impl UpstreamBody {
    fn new(inner: Inner, deadline: Instant) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// The next piece of the body as it arrives; `None` at its end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, BodyError>> {
        loop {
            match self.frame().await? {
                Ok(frame) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => return Some(Ok(data)),
                    // Trailers and empty frames carry nothing to relay.
                    _ => continue,
                },
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The whole body (one that arrived in one piece is not copied).
    pub async fn bytes(self) -> Result<Bytes, BodyError> {
        self.collect().await.map(Collected::to_bytes)
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let frame = match &mut this.inner {
            Inner::Direct(b, lease) => {
                let frame = Pin::new(b).poll_frame(cx).map_err(|e| error_chain(&e));
                if let Poll::Ready(None) = frame
                    && let Some(lease) = lease.take()
                {
                    lease.release();
                }
                frame
            }
            Inner::Proxied(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| error_chain(&e.without_url())),
        };
        match frame {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(BodyError::Broken))),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Timeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}
