//! Open-loop HTTP load generator for Tollgate's overhead benchmark.
//!
//! Each of `--connections` workers holds one HTTP/1.1 keep-alive connection.
//! At a fixed `--rate`, request `i` is due at `start + i / rate` and workers
//! take due slots in order; with `--rate 0` they send back to back (full
//! speed). Latency is measured from the moment a request is written to the
//! moment its whole body is read; how late sends left against their schedule
//! is reported separately, so timer granularity never pollutes latency.
//!
//! With `--compare-key`, every other request (by schedule slot, not by
//! connection) carries that key instead, and each key's requests are
//! reported on a line of their own: two configurations of the gateway
//! measured under the same load at the same moments, so that the host's
//! drift between runs, which moves a run's median by tens of µs on a
//! shared VM, falls on both alike.

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
    /// A second bearer key, sent on every other request and reported apart.
    #[arg(long)]
    compare_key: Option<String>,
    /// The label of the second key's result line.
    #[arg(long, default_value = "compared")]
    compare_label: String,
    /// A process whose CPU during the measured window (user and system
    /// apart, all its threads) is reported, e.g. the proxy under test;
    /// repeatable (nginx's workers).
    #[arg(long = "watch")]
    watch: Vec<u32>,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    s.trim_end_matches('s')
        .parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| e.to_string())
}

/// What one worker measured for one key.
struct Measured {
    latency: Histogram<u64>,
    lag: Histogram<u64>,
    errors: u64,
}

impl Measured {
    fn new() -> Self {
        Self {
            latency: histogram(),
            lag: histogram(),
            errors: 0,
        }
    }

    fn add(&mut self, other: &Self) -> Result<()> {
        self.latency.add(&other.latency)?;
        self.lag.add(&other.lag)?;
        self.errors += other.errors;
        Ok(())
    }
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
) -> Result<[Measured; 2]> {
    let stream = TcpStream::connect(&authority)
        .await
        .with_context(|| format!("connect {authority}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let body = Bytes::from(args.body.clone());
    let auths = [
        format!("Bearer {}", args.key),
        format!(
            "Bearer {}",
            args.compare_key.as_deref().unwrap_or(&args.key)
        ),
    ];
    let mut measured = [Measured::new(), Measured::new()];
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
        let which = usize::from(args.compare_key.is_some() && i % 2 == 1);
        let sent = Instant::now();
        let req = Request::post(path.as_str())
            .header("host", authority.as_str())
            .header("authorization", auths[which].as_str())
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let ok = resp.status().is_success();
        resp.into_body().collect().await?;
        let done = Instant::now();
        if sent >= measure_from {
            let m = &mut measured[which];
            let _ = m.latency.record((done - sent).as_micros().max(1) as u64);
            let _ = m
                .lag
                .record((sent.saturating_duration_since(due)).as_micros().max(1) as u64);
            if !ok {
                m.errors += 1;
            }
        }
    }
    Ok(measured)
}

/// The result line of one key's requests.
fn report(
    args: &Args,
    label: &str,
    m: &Measured,
    cpu_ticks: Option<u64>,
    watched: Option<(u64, u64)>,
) -> Result<()> {
    let latency = &m.latency;
    if latency.is_empty() {
        bail!("no request completed");
    }
    let secs = args.duration.as_secs_f64();
    let result = serde_json::json!({
        "label": label,
        "target_rate": args.rate,
        "connections": args.connections,
        "requests": latency.len(),
        "errors": m.errors,
        "rps": (latency.len() as f64 / secs).round(),
        "p50_us": latency.value_at_quantile(0.50),
        "p90_us": latency.value_at_quantile(0.90),
        "p99_us": latency.value_at_quantile(0.99),
        "p999_us": latency.value_at_quantile(0.999),
        "max_us": latency.max(),
        "send_lag_p99_us": m.lag.value_at_quantile(0.99),
        "loadgen_cpu_ticks": cpu_ticks,
        // Over both keys' requests when there are two.
        "watched_user_ticks": watched.map(|(user, _)| user),
        "watched_system_ticks": watched.map(|(_, system)| system),
    });
    println!("{result}");
    Ok(())
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
    // The watched processes' CPU is read when measuring starts and once
    // every worker is done.
    let watch = args.watch.clone();
    let watched_from = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        watched_ticks(&watch)
    });
    let mut measured = [Measured::new(), Measured::new()];
    for t in tasks {
        for (all, m) in measured.iter_mut().zip(t.await??) {
            all.add(&m)?;
        }
    }
    let watched = match (watched_from.await?, watched_ticks(&args.watch)) {
        (Some(from), Some(to)) => Some((to.0.saturating_sub(from.0), to.1.saturating_sub(from.1))),
        _ => None,
    };
    let cpu = cpu_ticks("self").map(|(user, system)| user + system);
    report(&args, &args.label, &measured[0], cpu, watched)?;
    if args.compare_key.is_some() {
        report(&args, &args.compare_label, &measured[1], cpu, watched)?;
    }
    Ok(())
}

/// The watched processes' CPU so far, user and system, summed; `None` when
/// none is watched or one has gone.
fn watched_ticks(pids: &[u32]) -> Option<(u64, u64)> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold((0, 0), |(user, system), pid| {
        let (u, s) = cpu_ticks(&pid.to_string())?;
        Some((user + u, system + s))
    })
}

/// A process's CPU so far (user and system, all threads), in clock ticks,
/// from `/proc/PROCESS/stat` (`self`: what generating the load cost, for
/// the scripts that add up what a request costs every process of a run).
fn cpu_ticks(process: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{process}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: the state
    // (field 3) first, utime and stime (fields 14 and 15) eleven on.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user, system))
}
