//! `tollgate batch`: OpenAI batch-format JSONL through the paced, retrying
//! client, resumable.
//!
//! The output files are the checkpoint. Every finished request is one line,
//! appended and flushed as soon as it is known: its result in the results
//! file, or its classified failure in the failures file. A rerun of the
//! same command reads both, drops a torn last line, and sends only what is
//! missing. Each request's `Idempotency-Key` is derived from its
//! `custom_id`, so a request that was in flight when the run died carries
//! the same key when it is sent again.

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};
use tokio::task::JoinSet;
use tollgate_client::{Client, ClientConfig, Error as ClientError, RetryPolicy};

/// Options of `tollgate batch`.
#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Requests, one JSON object per line: `custom_id`, `method`, `url`, `body`.
    input: PathBuf,
    /// Results, one line per succeeded request (appended; also the checkpoint).
    #[arg(short, long)]
    output: PathBuf,
    /// Failures with their classified reason (default: OUTPUT with `.failures` before the extension).
    #[arg(long)]
    failures: Option<PathBuf>,
    /// Base URL including `/v1`.
    #[arg(
        long,
        env = "TOLLGATE_BASE_URL",
        default_value = "http://127.0.0.1:8080/v1"
    )]
    base_url: String,
    /// API key (or several, comma-separated, paced each on its own).
    #[arg(
        long,
        env = "TOLLGATE_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    api_key: Vec<String>,
    /// Requests per minute allowed per key.
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute allowed per key.
    #[arg(long)]
    tpm: Option<u64>,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Attempts per request, the first included.
    #[arg(long, default_value_t = 8)]
    max_attempts: u32,
    /// A model to try when a request's own model gives up or does not
    /// exist (repeatable, tried in order).
    #[arg(long = "fallback-model")]
    fallback_models: Vec<String>,
    /// On a daily cap, wait for the reset instead of stopping.
    #[arg(long)]
    wait_for_reset: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// One input line.
#[derive(Debug, Deserialize)]
struct BatchLine {
    custom_id: String,
    #[serde(default = "post")]
    method: String,
    url: String,
    body: serde_json::Value,
}

fn post() -> String {
    "POST".into()
}

/// Why a run stopped before the end: each has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Budget,
    Credits,
    DailyCap,
}

impl Stop {
    fn exit_code(self) -> u8 {
        match self {
            Stop::Budget => 3,
            Stop::Credits => 4,
            Stop::DailyCap => 5,
        }
    }
}

fn default_failures(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or_else(|| "results".into(), |s| s.to_string_lossy().into_owned());
    let ext = output
        .extension()
        .map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
    output.with_file_name(format!("{stem}.failures{ext}"))
}

/// The `custom_id`s a results or failures file already holds; a torn last
/// line (a run killed mid-write) is cut off.
fn finished_ids(path: &Path, into: &mut HashSet<String>) -> anyhow::Result<()> {
    let Ok(mut file) = OpenOptions::new().read(true).write(true).open(path) else {
        return Ok(());
    };
    let mut good_len = 0u64;
    let mut reader = BufReader::new(&mut file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            break;
        }
        let complete = line.ends_with('\n');
        let id = serde_json::from_str::<serde_json::Value>(line.trim_end())
            .ok()
            .and_then(|v| v["custom_id"].as_str().map(str::to_owned));
        match (complete, id) {
            (true, Some(id)) => {
                into.insert(id);
                good_len += n as u64;
            }
            _ => break,
        }
    }
    drop(reader);
    if file.metadata()?.len() != good_len {
        file.set_len(good_len)?;
        file.seek(SeekFrom::End(0))?;
    }
    Ok(())
}

fn append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

fn idempotency_key(input: &Path, custom_id: &str) -> String {
    // DefaultHasher::new() has fixed keys: the same id gives the same key
    // in every run, which is the point.
    let mut h = DefaultHasher::new();
    input.file_name().hash(&mut h);
    custom_id.hash(&mut h);
    format!("tg-batch-{:016x}-{}", h.finish(), custom_id.len())
}

/// What one request came to.
enum Outcome {
    Done {
        line: String,
        tokens: u64,
    },
    Failed {
        line: String,
    },
    /// Not done: the run must stop (or wait); the request goes back.
    Stopped {
        stop: Stop,
        why: String,
        until: Option<SystemTime>,
        request: BatchLine,
    },
}

async fn run_one(client: Arc<Client>, input: Arc<PathBuf>, req: BatchLine) -> Outcome {
    let path = req.url.strip_prefix("/v1").unwrap_or(&req.url).to_owned();
    let body = Bytes::from(req.body.to_string());
    let key = idempotency_key(&input, &req.custom_id);
    match client.post_json_idempotent(&path, body, key).await {
        Ok(answer) => {
            let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
            let request_id = answer
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let line = serde_json::json!({
                "id": format!("batch_req_{}", req.custom_id),
                "custom_id": req.custom_id,
                "response": {"status_code": answer.status, "request_id": request_id, "body": body},
                "error": null,
            });
            Outcome::Done {
                line: line.to_string(),
                tokens: answer.tokens.unwrap_or(0),
            }
        }
        Err(e) => {
            let stop = match &e {
                ClientError::BudgetExhausted { .. } => Some((Stop::Budget, None)),
                ClientError::TopUp { .. } => Some((Stop::Credits, None)),
                ClientError::DailyCap { until } => Some((Stop::DailyCap, Some(*until))),
                _ => None,
            };
            match stop {
                Some((stop, until)) => Outcome::Stopped {
                    stop,
                    why: e.to_string(),
                    until,
                    request: req,
                },
                None => Outcome::Failed {
                    line: serde_json::json!({
                        "custom_id": req.custom_id,
                        "error": {"message": e.to_string(), "kind": failure_kind(&e)},
                    })
                    .to_string(),
                },
            }
        }
    }
}

fn failure_kind(e: &ClientError) -> &'static str {
    match e {
        ClientError::Rejected { .. } => "rejected",
        ClientError::GaveUp { .. } => "gave_up",
        ClientError::Config(_) => "config",
        ClientError::BudgetExhausted { .. } => "budget_exceeded",
        ClientError::TopUp { .. } => "insufficient_credits",
        ClientError::DailyCap { .. } => "daily_cap",
    }
}

/// Runs a batch; the exit code says how it ended.
pub async fn run(args: BatchArgs) -> anyhow::Result<ExitCode> {
    let failures_path = args
        .failures
        .clone()
        .unwrap_or_else(|| default_failures(&args.output));
    let mut done = HashSet::new();
    finished_ids(&args.output, &mut done)?;
    finished_ids(&failures_path, &mut done)?;

    let reader = BufReader::new(
        File::open(&args.input).with_context(|| format!("cannot read {}", args.input.display()))?,
    );
    let mut pending = Vec::new();
    let mut seen = HashSet::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let req: BatchLine = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: not a batch request",
                args.input.display(),
                n + 1
            )
        })?;
        if !req.method.eq_ignore_ascii_case("POST") {
            bail!(
                "{} line {}: only POST requests can be batched",
                args.input.display(),
                n + 1
            );
        }
        if !seen.insert(req.custom_id.clone()) {
            bail!(
                "{} line {}: custom_id `{}` appears twice",
                args.input.display(),
                n + 1,
                req.custom_id
            );
        }
        if !done.contains(&req.custom_id) {
            pending.push(req);
        }
    }
    let total = seen.len() as u64;
    let already = total - pending.len() as u64;

    let keys = if args.api_key.is_empty() {
        vec![
            std::env::var("OPENAI_API_KEY")
                .context("no API key: pass --api-key or set TOLLGATE_API_KEY")?,
        ]
    } else {
        args.api_key.clone()
    };
    let mut config = ClientConfig::new(args.base_url.clone(), keys[0].clone());
    config.keys = keys;
    config.rpm = args.rpm;
    config.tpm = args.tpm;
    config.concurrency = args.concurrency.max(1);
    config.fallback_models = args.fallback_models.clone();
    config.retry = RetryPolicy {
        max_attempts: args.max_attempts.max(1),
        budget: Duration::from_secs(600),
        ..RetryPolicy::default()
    };
    let client = Arc::new(Client::new(config)?);

    let bar = ProgressBar::new(total);
    bar.set_draw_target(if args.quiet || args.json {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {per_sec} ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(already);

    let mut results = append(&args.output)?;
    let mut failures = append(&failures_path)?;
    let input = Arc::new(args.input.clone());
    let started = Instant::now();
    let (mut ok, mut failed, mut tokens) = (0u64, 0u64, 0u64);
    let mut stop: Option<(Stop, String)> = None;
    let mut queue: std::collections::VecDeque<BatchLine> = pending.into();
    let mut running = JoinSet::new();
    // Enough tasks to keep every permit busy, not one per line.
    let window = args.concurrency.max(1) * 2;
    loop {
        while stop.is_none() && running.len() < window {
            let Some(req) = queue.pop_front() else { break };
            running.spawn(run_one(client.clone(), input.clone(), req));
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        match joined.context("a request task failed")? {
            Outcome::Done { line, tokens: t } => {
                writeln!(results, "{line}")?;
                results.flush()?;
                ok += 1;
                tokens += t;
                bar.inc(1);
            }
            Outcome::Failed { line } => {
                writeln!(failures, "{line}")?;
                failures.flush()?;
                failed += 1;
                bar.inc(1);
            }
            Outcome::Stopped {
                stop: s,
                why,
                until,
                request,
            } => {
                queue.push_front(request);
                if s == Stop::DailyCap && args.wait_for_reset {
                    let wait = until
                        .and_then(|t| t.duration_since(SystemTime::now()).ok())
                        .unwrap_or(Duration::from_secs(60));
                    bar.println(format!(
                        "{why}; waiting {wait:?} for the reset (--wait-for-reset)"
                    ));
                    tokio::time::sleep(wait).await;
                    continue;
                }
                if stop.is_none() {
                    bar.println(format!("stopping: {why}"));
                    stop = Some((s, why));
                }
            }
        }
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!(
            "{failed} failed, {:.0} tokens/s",
            tokens as f64 / secs
        ));
    }
    bar.finish_and_clear();

    let elapsed = started.elapsed();
    let remaining = total - already - ok - failed;
    let summary = serde_json::json!({
        "total": total,
        "already_done": already,
        "succeeded": ok,
        "failed": failed,
        "remaining": remaining,
        "seconds": elapsed.as_secs_f64(),
        "requests_per_second": (ok + failed) as f64 / elapsed.as_secs_f64().max(1e-3),
        "tokens": tokens,
        "sent": client.counters.sent.load(Ordering::Relaxed),
        "throttled": client.counters.throttled.load(Ordering::Relaxed),
        "retries": client.counters.retries.load(Ordering::Relaxed),
        "stopped": stop.as_ref().map(|(_, why)| why.clone()),
        "results": args.output,
        "failures": failures_path,
    });
    if args.json {
        out!("{summary}")?;
    } else if !args.quiet {
        eprintln!("{:<14} {}", "requests", total);
        eprintln!("{:<14} {}", "done before", already);
        eprintln!("{:<14} {}", "succeeded", ok);
        eprintln!("{:<14} {}", "failed", failed);
        eprintln!("{:<14} {}", "remaining", remaining);
        eprintln!("{:<14} {:.1}s", "time", elapsed.as_secs_f64());
        eprintln!("{:<14} {}", "tokens", tokens);
        eprintln!(
            "{:<14} {} sent, {} answered 429, {} retries",
            "attempts",
            client.counters.sent.load(Ordering::Relaxed),
            client.counters.throttled.load(Ordering::Relaxed),
            client.counters.retries.load(Ordering::Relaxed)
        );
    }
    match stop {
        Some((s, why)) => {
            eprintln!("stopped: {why}");
            eprintln!(
                "resume with the same command: {}",
                std::env::args().collect::<Vec<_>>().join(" ")
            );
            Ok(ExitCode::from(s.exit_code()))
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_and_not_counted() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("results.jsonl");
        std::fs::write(
            &path,
            "{\"custom_id\":\"a\"}\n{\"custom_id\":\"b\"}\n{\"custom_id\":\"c\",\"resp",
        )?;
        let mut ids = HashSet::new();
        finished_ids(&path, &mut ids)?;
        assert_eq!(ids.len(), 2);
        assert!(ids.contains("a") && ids.contains("b"));
        assert!(std::fs::read_to_string(&path)?.ends_with("\"b\"}\n"));
        Ok(())
    }

    #[test]
    fn failures_sit_beside_the_results() {
        assert_eq!(
            default_failures(Path::new("out/results.jsonl")),
            PathBuf::from("out/results.failures.jsonl")
        );
    }
}
