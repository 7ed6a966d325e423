//! Open-loop HTTP load generator for Tollgate's overhead benchmark.
//!
//! Each of `--connections` workers holds one HTTP/1.1 keep-alive connection.
//! At a fixed `--rate`, request `i` is due at `start + i / rate` and workers
//! take due slots in order; with `--rate 0` they send back to back (full
//! speed). Latency is measured from the moment a request is written to the
//! moment its whole body is read; how late sends left against their schedule
//! is reported separately, so timer granularity never pollutes latency.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Command-line options.
#[derive(Debug, Parser)]
struct Args {
    /// Target URL, e.g. http://127.0.0.1:8080/v1/chat/completions.
    #[arg(long)]
    url: String,
    /// Bearer key.
    #[arg(long, default_value = "sk-bench")]
    key: String,
    /// Request body (JSON).
    #[arg(
        long,
        default_value = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello, how are you?"}],"max_tokens":16}"#
    )]
    body: String,
    /// Requests per second; 0 = as fast as the connections allow.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Measured duration.
    #[arg(long, value_parser = humantime_secs, default_value = "10")]
    duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, value_parser = humantime_secs, default_value = "2")]
    warmup: Duration,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// A label for the result line.
    #[arg(long, default_value = "run")]
    label: String,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    s.trim_end_matches('s')
        .parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| e.to_string())
}

/// What one worker measured.
struct Measured {
    latency: Histogram<u64>,
    lag: Histogram<u64>,
    errors: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

async fn worker(
    args: Arc<Args>,
    authority: String,
    path: String,
    next: Arc<AtomicU64>,
    start: Instant,
    end: Instant,
    measure_from: Instant,
) -> Result<Measured> {
    let stream = TcpStream::connect(&authority)
        .await
        .with_context(|| format!("connect {authority}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let body = Bytes::from(args.body.clone());
    let auth = format!("Bearer {}", args.key);
    let mut m = Measured {
        latency: histogram(),
        lag: histogram(),
        errors: 0,
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let due = match (i * 1_000_000_000).checked_div(args.rate) {
            Some(offset_ns) => start + Duration::from_nanos(offset_ns),
            None => Instant::now(),
        };
        if due >= end {
            break;
        }
        if args.rate > 0 {
            tokio::time::sleep_until(due.into()).await;
        }
        let sent = Instant::now();
        let req = Request::post(path.as_str())
            .header("host", authority.as_str())
            .header("authorization", auth.as_str())
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let ok = resp.status().is_success();
        resp.into_body().collect().await?;
        let done = Instant::now();
        if sent >= measure_from {
            let _ = m.latency.record((done - sent).as_micros().max(1) as u64);
            let _ = m
                .lag
                .record((sent.saturating_duration_since(due)).as_micros().max(1) as u64);
            if !ok {
                m.errors += 1;
            }
        }
    }
    Ok(m)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let rest = args
        .url
        .strip_prefix("http://")
        .context("only http:// URLs")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (authority, path) = (
        authority.to_owned(),
        if path.is_empty() {
            "/".to_owned()
        } else {
            path.to_owned()
        },
    );
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        tasks.push(tokio::spawn(worker(
            args.clone(),
            authority.clone(),
            path.clone(),
            next.clone(),
            start,
            end,
            measure_from,
        )));
    }
    let mut latency = histogram();
    let mut lag = histogram();
    let mut errors = 0;
    for t in tasks {
        let m = t.await??;
        latency.add(&m.latency)?;
        lag.add(&m.lag)?;
        errors += m.errors;
    }
    if latency.is_empty() {
        bail!("no request completed");
    }
    let secs = args.duration.as_secs_f64();
    let result = serde_json::json!({
        "label": args.label,
        "target_rate": args.rate,
        "connections": args.connections,
        "requests": latency.len(),
        "errors": errors,
        "rps": (latency.len() as f64 / secs).round(),
        "p50_us": latency.value_at_quantile(0.50),
        "p90_us": latency.value_at_quantile(0.90),
        "p99_us": latency.value_at_quantile(0.99),
        "p999_us": latency.value_at_quantile(0.999),
        "max_us": latency.max(),
        "send_lag_p99_us": lag.value_at_quantile(0.99),
    });
    println!("{result}");
    Ok(())
}
