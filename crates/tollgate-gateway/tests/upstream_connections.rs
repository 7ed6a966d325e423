//! The connections calls to a deployment travel on, against a provider
//! made of a bare TCP listener that counts the connections it accepts and
//! keeps every request head it reads: kept alive and reused from call to
//! call, closed when the provider says so or a body is left unread, and
//! each request written as a provider expects (the path in the request
//! line, a `Host` header).

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Notify};
use tollgate_gateway::transport::Transport;

mod common;

/// How the provider answers.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    /// `ok`, the connection kept.
    KeepAlive,
    /// `ok` with `Connection: close`, then the connection closed.
    Close,
    /// Ten bytes promised and five sent, the rest never.
    Partial,
}

/// What the provider saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    heads: Mutex<Vec<String>>,
    /// Wakes when a request has been read.
    request: Notify,
}

async fn provider(answer: Answer) -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let counted = Arc::clone(&seen);
    let url = common::own_provider("http", move |socket| {
        counted.connections.fetch_add(1, Ordering::SeqCst);
        serve(socket, answer, Arc::clone(&counted))
    })
    .await;
    (url, seen)
}

/// Answers each request of one connection.
async fn serve(mut socket: TcpStream, answer: Answer, seen: Arc<Seen>) {
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_until_head_end(&mut socket, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            if !read_more(&mut socket, &mut buf).await {
                return;
            }
        }
        buf.drain(..head_end + length);
        seen.heads.lock().await.push(head);
        seen.request.notify_one();
        let reply: &[u8] = match answer {
            Answer::KeepAlive => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            Answer::Close => b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            Answer::Partial => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst",
        };
        if socket.write_all(reply).await.is_err() || answer == Answer::Close {
            return;
        }
    }
}

/// Reads until `buf` holds a whole request head; the head's length.
async fn read_until_head_end(socket: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(at + 4);
        }
        if !read_more(socket, buf).await {
            return None;
        }
    }
}

async fn read_more(socket: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match socket.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn transport(url: &str) -> Transport {
    let uri = url.parse().expect("url");
    Transport::new(&uri, Duration::from_secs(5), 1).expect("transport")
}

/// One call, its body read whole.
async fn call(transport: &Transport, url: &str) -> Bytes {
    let body = common::call_upstream(transport, url).await.into_body();
    body.bytes().await.expect("the body")
}

#[tokio::test]
async fn calls_one_after_another_share_one_connection() {
    let (url, seen) = provider(Answer::KeepAlive).await;
    let transport = transport(&url);
    for _ in 0..5 {
        assert_eq!(call(&transport, &url).await, "ok");
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    let heads = seen.heads.lock().await;
    assert_eq!(heads.len(), 5);
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .expect("authority");
    for head in heads.iter() {
        assert!(
            head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("\r\nhost: {host}\r\n")),
            "{head}"
        );
    }
}

#[tokio::test]
async fn a_connection_the_provider_closes_is_not_used_again() {
    let (url, seen) = provider(Answer::Close).await;
    let transport = transport(&url);
    for _ in 0..3 {
        assert_eq!(call(&transport, &url).await, "ok");
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn calls_at_once_open_their_own_connections_then_reuse_them() {
    let (url, seen) = provider(Answer::KeepAlive).await;
    let transport = transport(&url);
    let (a, b) = tokio::join!(call(&transport, &url), call(&transport, &url));
    assert_eq!((a, b), ("ok".into(), "ok".into()));
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    for _ in 0..4 {
        call(&transport, &url).await;
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_body_left_unread_does_not_lend_its_connection_again() {
    let (url, seen) = provider(Answer::Partial).await;
    let transport = transport(&url);
    let mut body = common::call_upstream(&transport, &url).await.into_body();
    assert_eq!(
        body.chunk().await.and_then(Result::ok).as_deref(),
        Some(&b"first"[..])
    );
    // The rest never comes: the client gives up on the body.
    drop(body);
    let second = tokio::spawn(async move { drop(common::call_upstream(&transport, &url).await) });
    // The second call reaches the provider, on a connection of its own.
    loop {
        if seen.heads.lock().await.len() == 2 {
            break;
        }
        seen.request.notified().await;
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    second.abort();
}
