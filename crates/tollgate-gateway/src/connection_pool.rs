//! Keep-alive connections to one deployment, opened and used by one
//! serving thread: a stack of idle HTTP/1.1 connections, the most recently
//! used on top (warm; the oldest age out at the bottom), and the HTTP/2
//! connection all calls share when the provider chose HTTP/2.
//!
//! Kept here rather than in hyper-util's pooled client, which spent about
//! 7k instructions a call (of about 99k) on bookkeeping a pool with one
//! destination does not need: the pool key (scheme and authority, hashed a
//! byte at a time through SipHash) hashed once to take a connection and
//! again to give it back, a connect future built and raced against every
//! checkout, and the connection's details copied into every response.

use crate::transport::{BoxError, Connector};
use bytes::Bytes;
use http::header::HOST;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use tower_service::Service;

type Body = Full<Bytes>;

/// Most idle HTTP/1.1 connections a pool keeps; past them a connection
/// whose call ended is closed.
const MAX_IDLE: usize = 1024;

/// Connections to one deployment's scheme and authority.
pub struct ConnectionPool {
    connector: Connector,
    /// A URL of the deployment: connections go to its scheme and
    /// authority (the connector reads nothing else).
    destination: Uri,
    /// The `Host` header of HTTP/1.1 calls, made once.
    host: Option<HeaderValue>,
    /// How long a connection may sit idle and still be used.
    idle_for: Duration,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// Pushed when a call's response ends, taken from the top.
    http1: Vec<(http1::SendRequest<Body>, Instant)>,
    /// With when a call last took it.
    http2: Option<(http2::SendRequest<Body>, Instant)>,
}

/// The connection a call goes out on.
enum Sender {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

/// An HTTP/1.1 connection lent to one call: it goes back to its pool when
/// the response body has been read to its end, and is closed if the body
/// is dropped before.
pub struct Lease {
    pool: Arc<ConnectionPool>,
    connection: http1::SendRequest<Body>,
}

impl Lease {
    /// Returns the connection to its pool, the body being read whole.
    pub fn release(self) {
        self.pool.put(self.connection);
    }
}

impl std::fmt::Debug for ConnectionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

impl ConnectionPool {
    /// A pool of connections to `url`'s scheme and authority, opened
    /// through `connector`, each kept at most `idle_for` unused.
    pub fn new(connector: Connector, url: &Uri, idle_for: Duration) -> Self {
        Self {
            connector,
            destination: url.clone(),
            host: host_header(url),
            idle_for,
            idle: Mutex::default(),
        }
    }

    /// Sends `request` (its URI absolute) on an idle connection, or a new
    /// one. A request that a reused connection closed before taking is
    /// sent again on another: the provider may close an idle connection
    /// at any moment, and a request it never read is safe to resend.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Body>,
    ) -> Result<(Response<Incoming>, Option<Lease>), BoxError> {
        loop {
            let (mut sender, reused) = match self.take() {
                Some(sender) => (sender, true),
                // Boxed: the handshakes' state, kept inline, would make
                // every call's future (moved whole into axum's box three
                // times a request) kilobytes larger for a rare step.
                None => (Box::pin(self.connect()).await?, false),
            };
            let sent = match &mut sender {
                Sender::Http1(connection) => {
                    let absolute = request.uri().clone();
                    self.http1_form(&mut request);
                    connection.try_send_request(request).await.map_err(|mut e| {
                        let unsent = e.take_message().map(|mut r| {
                            *r.uri_mut() = absolute;
                            r
                        });
                        (e.into_error(), unsent)
                    })
                }
                Sender::Http2(connection) => {
                    let sent = connection.try_send_request(request).await;
                    if sent.is_err() {
                        // Calls to come open a new one.
                        self.lock().http2 = None;
                    }
                    sent.map_err(|mut e| {
                        let unsent = e.take_message();
                        (e.into_error(), unsent)
                    })
                }
            };
            match sent {
                Ok(response) => {
                    let lease = match sender {
                        Sender::Http1(connection) => Some(Lease {
                            pool: Arc::clone(self),
                            connection,
                        }),
                        Sender::Http2(_) => None,
                    };
                    return Ok((response, lease));
                }
                Err((_, Some(unsent))) if reused => request = unsent,
                Err((error, _)) => return Err(error.into()),
            }
        }
    }

    /// The HTTP/2 connection, or the most recently used idle HTTP/1.1
    /// one, if open, waiting for a request, and used within `idle_for`.
    fn take(&self) -> Option<Sender> {
        let now = Instant::now();
        let mut idle = self.lock();
        if let Some((shared, since)) = &mut idle.http2 {
            if shared.is_ready() && now.duration_since(*since) < self.idle_for {
                *since = now;
                return Some(Sender::Http2(shared.clone()));
            }
            idle.http2 = None;
        }
        while let Some((connection, since)) = idle.http1.pop() {
            if connection.is_ready() && now.duration_since(since) < self.idle_for {
                return Some(Sender::Http1(connection));
            }
        }
        None
    }

    /// Puts a connection whose call ended on top of the idle ones, and
    /// closes the ones at the bottom that sat unused too long.
    fn put(&self, connection: http1::SendRequest<Body>) {
        // hyper's connection task asks for the next request in the same
        // turn that ends the response body, before the body's reader
        // wakes on this thread (where the task runs too): one not asking
        // now is closing (the provider sent `Connection: close`, or broke
        // the connection). On a runtime of several threads a reader may
        // get here first, and the connection is closed, not reused.
        if !connection.is_ready() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        if idle
            .http1
            .first()
            .is_some_and(|(_, since)| now.duration_since(*since) >= self.idle_for)
        {
            idle.http1
                .retain(|(_, since)| now.duration_since(*since) < self.idle_for);
        }
        if idle.http1.len() < MAX_IDLE {
            idle.http1.push((connection, now));
        }
    }

    /// Opens a connection (TLS included for https) and starts its task on
    /// this thread; HTTP/2 when the provider chose it in the handshake.
    async fn connect(&self) -> Result<Sender, BoxError> {
        let io = self
            .connector
            .clone()
            .call(self.destination.clone())
            .await?;
        if io.connected().is_negotiated_h2() {
            let (mut connection, task) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = task.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            connection.ready().await?;
            self.lock().http2 = Some((connection.clone(), Instant::now()));
            Ok(Sender::Http2(connection))
        } else {
            let (mut connection, task) = http1::handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = task.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            connection.ready().await?;
            Ok(Sender::Http1(connection))
        }
    }

    /// Turns `request` into what an HTTP/1.1 connection sends: the path
    /// alone in its request line and a `Host` header.
    fn http1_form(&self, request: &mut Request<Body>) {
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
        if let Some(host) = &self.host {
            request
                .headers_mut()
                .entry(HOST)
                .or_insert_with(|| host.clone());
        }
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        // The idle list is whole after any panic that could poison it.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `host[:port]`, the port left out when it is the scheme's default.
fn host_header(url: &Uri) -> Option<HeaderValue> {
    let host = url.host()?;
    let default_port = if url.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    let text = match url.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As hyper's client writes it: the port only when it is not the
    /// scheme's default, never the user part.
    #[test]
    fn host_is_what_hyper_would_write() {
        for (url, host) in [
            ("http://127.0.0.1:18080/v1", "127.0.0.1:18080"),
            ("http://localhost/v1", "localhost"),
            ("http://models.internal:80/v1", "models.internal"),
            (
                "http://user:secret@models.internal:81/v1",
                "models.internal:81",
            ),
            ("http://[::1]:8000/v1", "[::1]:8000"),
            ("https://api.openai.com/v1", "api.openai.com"),
            ("https://models.internal:443/v1", "models.internal"),
            ("https://models.internal:8443/v1", "models.internal:8443"),
            ("https://models.internal:80/v1", "models.internal:80"),
        ] {
            let written = host_header(&url.parse().expect(url));
            assert_eq!(
                written.as_ref().map(|h| h.to_str().expect("ascii")),
                Some(host),
                "{url}"
            );
        }
    }
}
