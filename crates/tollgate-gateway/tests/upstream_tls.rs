//! Calls to a deployment over TLS, as to a hosted provider: HTTP/2 when the
//! provider offers it in the handshake (api.openai.com does), every call
//! on the one connection; HTTP/1.1 kept alive when it does not. The
//! provider here is hyper behind rustls with a certificate of a test CA
//! (`tests/tls`, valid until 2126).
//!
//! The gateway trusts what the platform trusts; on Linux the test CA gets
//! there through `SSL_CERT_FILE`, which has to be in the environment when
//! the process starts (a running test may not change it: that is
//! `unsafe`). So each test runs itself again in a child process that has
//! it, and checks that the child ran it and passed.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tollgate_gateway::transport::Transport;

mod common;

/// Set in the child process that runs a test with the test CA trusted.
const CHILD: &str = "TOLLGATE_TEST_CA_CHILD";

fn tls_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tls")
}

/// In the parent: runs `test` in a child that trusts the test CA, asserts
/// that it ran and passed, and answers true (the caller returns). In the
/// child: false (the caller runs the test).
fn ran_in_child(test: &str) -> bool {
    if std::env::var_os(CHILD).is_some() {
        return false;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([test, "--exact", "--test-threads=1"])
        .env(CHILD, "1")
        .env("SSL_CERT_FILE", tls_dir().join("ca.pem"))
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{test} in the child:\n{stdout}\n{stderr}"
    );
    true
}

/// What the provider saw of each call.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// Version, URI and `Host` of each request.
    requests: Mutex<Vec<(http::Version, String, Option<String>)>>,
}

/// A provider on 127.0.0.1 offering `alpn` in its TLS handshake; its
/// chat completions URL.
async fn provider(alpn: &[&[u8]]) -> (String, Arc<Seen>) {
    let certs = CertificateDer::pem_file_iter(tls_dir().join("provider.pem"))
        .expect("provider.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(tls_dir().join("provider.key")).expect("provider.key");
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let seen = Arc::new(Seen::default());
    let counted = Arc::clone(&seen);
    let url = common::own_provider("https", move |socket| {
        counted.connections.fetch_add(1, Ordering::SeqCst);
        let (acceptor, seen) = (acceptor.clone(), Arc::clone(&counted));
        async move {
            let Ok(tls) = acceptor.accept(socket).await else {
                return;
            };
            let answer = service_fn(move |req: http::Request<Incoming>| {
                let host = req
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned);
                seen.requests.lock().expect("requests").push((
                    req.version(),
                    req.uri().to_string(),
                    host,
                ));
                async { Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from("ok")))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), answer)
                .await;
        }
    })
    .await;
    (url, seen)
}

async fn call(transport: &Transport, url: &str) {
    let response = common::call_upstream(transport, url).await;
    let body = response.into_body().bytes().await.expect("the body");
    assert_eq!(body, "ok");
}

#[tokio::test]
async fn https_calls_share_one_http2_connection_when_the_provider_offers_it() {
    if ran_in_child("https_calls_share_one_http2_connection_when_the_provider_offers_it") {
        return;
    }
    let (url, seen) = provider(&[b"h2", b"http/1.1"]).await;
    let transport =
        Transport::new(&url.parse().expect("url"), Duration::from_secs(5), 1).expect("transport");
    call(&transport, &url).await;
    tokio::join!(
        call(&transport, &url),
        call(&transport, &url),
        call(&transport, &url)
    );
    call(&transport, &url).await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    let requests = seen.requests.lock().expect("requests");
    assert_eq!(requests.len(), 5);
    for (version, uri, _) in requests.iter() {
        assert_eq!(*version, http::Version::HTTP_2);
        assert_eq!(*uri, url);
    }
}

#[tokio::test]
async fn https_calls_reuse_an_http1_connection_when_the_provider_offers_no_http2() {
    if ran_in_child("https_calls_reuse_an_http1_connection_when_the_provider_offers_no_http2") {
        return;
    }
    let (url, seen) = provider(&[b"http/1.1"]).await;
    let transport =
        Transport::new(&url.parse().expect("url"), Duration::from_secs(5), 1).expect("transport");
    for _ in 0..3 {
        call(&transport, &url).await;
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    let authority = url
        .trim_start_matches("https://")
        .split('/')
        .next()
        .map(str::to_owned);
    let requests = seen.requests.lock().expect("requests");
    assert_eq!(requests.len(), 3);
    for (version, uri, host) in requests.iter() {
        assert_eq!(*version, http::Version::HTTP_11);
        assert_eq!(uri, "/v1/chat/completions");
        assert_eq!(*host, authority);
    }
}
