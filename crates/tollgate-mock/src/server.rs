//! The mock's accept loop. It is hand-rolled (not `axum::serve`) for one
//! reason: the `reset` fault must be able to abort its own TCP connection
//! with an RST, which needs the socket, not just the request.

use crate::Error;
use crate::config::MockConfig;
use crate::handlers::{MockState, router};
use crate::limits::ProviderLimits;
use crate::stats::MockStats;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Lets a handler abort the connection its request came on.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectionKiller(Arc<Notify>);

impl ConnectionKiller {
    /// Aborts the connection with a TCP reset.
    pub(crate) fn kill(&self) {
        self.0.notify_one();
    }
}

/// A running mock provider; dropping it stops accepting connections.
#[derive(Debug)]
pub struct MockServer {
    addr: SocketAddr,
    stats: Arc<MockStats>,
    accept: JoinHandle<()>,
}

impl MockServer {
    /// Starts a mock on `addr` (port 0 for an ephemeral port).
    pub async fn start(config: MockConfig, addr: SocketAddr) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let stats = Arc::new(MockStats::default());
        let state = Arc::new(MockState {
            limits: ProviderLimits::new(&config),
            config,
            stats: stats.clone(),
        });
        let accept = tokio::spawn(accept_loop(listener, state));
        Ok(Self {
            addr,
            stats,
            accept,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its OpenAI base URL, `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// What it has seen so far.
    pub fn stats(&self) -> &Arc<MockStats> {
        &self.stats
    }

    /// Runs until the process ends.
    pub async fn run_forever(mut self) {
        let _ = (&mut self.accept).await;
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<MockState>) {
    let app = router(state);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "mock accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // A duplicate of the socket, kept only to set SO_LINGER=0 before an
        // injected reset; the connection itself owns the original.
        let Ok(std_stream) = stream.into_std() else {
            continue;
        };
        let Ok(dup) = std_stream.try_clone() else {
            continue;
        };
        let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) else {
            continue;
        };
        let killer = ConnectionKiller::default();
        let app = app.clone();
        tokio::spawn(async move {
            let k = killer.clone();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(k.clone());
                hyper::service::Service::call(&TowerToHyperService::new(app.clone()), req)
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = killer.0.notified() => {
                    let _ = socket2::SockRef::from(&dup).set_linger(Some(std::time::Duration::ZERO));
                }
            }
        });
    }
}
