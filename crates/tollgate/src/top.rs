//! `tollgate top`: live traffic per key, from the gateway's `/metrics`,
//! redrawn every second like `top`.
//!
//! It reads the same counters an operator's Prometheus scrapes, so what it
//! shows and what the dashboards show cannot disagree. The few lines of
//! exposition-format parsing are written here: a parser crate would bring
//! a regex engine into the binary for them.

use anyhow::Context;
use clap::Args;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// `tollgate top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The gateway's base URL.
    #[arg(long, env = "TOLLGATE_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Time between refreshes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Stop after this many refreshes (default: until interrupted).
    #[arg(long)]
    iterations: Option<u64>,
}

/// One key's counters at one scrape.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct KeyTotals {
    requests: f64,
    refused: f64,
    tokens: f64,
    cost_micros: f64,
}

/// A sample's labels, in order.
type Labels = Vec<(String, String)>;

/// A sample line: its name, labels and value; `None` for comments, blank
/// lines and anything malformed.
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = head.split_once('{') else {
        return Some((head, Vec::new(), value));
    };
    let mut labels = Vec::new();
    let mut chars = rest.strip_suffix('}')?.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name, labels, value))
}

/// Per-key totals of a `/metrics` text.
fn totals(text: &str) -> BTreeMap<String, KeyTotals> {
    let mut keys: BTreeMap<String, KeyTotals> = BTreeMap::new();
    for (name, labels, value) in text.lines().filter_map(sample) {
        let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let Some(key) = label("key") else { continue };
        let t = keys.entry(key.to_owned()).or_default();
        match name {
            "tollgate_requests_total" => {
                t.requests += value;
                if label("status") == Some("429") || label("status") == Some("402") {
                    t.refused += value;
                }
            }
            "tollgate_tokens_total" => t.tokens += value,
            "tollgate_cost_micro_usd_total" => t.cost_micros += value,
            _ => {}
        }
    }
    keys
}

/// One frame: rates since `before`, over `elapsed`.
fn frame(
    url: &str,
    now: &BTreeMap<String, KeyTotals>,
    before: &BTreeMap<String, KeyTotals>,
    elapsed: Duration,
) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mut rows: Vec<(&String, f64, f64, f64, f64)> = now
        .iter()
        .map(|(key, t)| {
            let b = before.get(key).copied().unwrap_or_default();
            (
                key,
                (t.requests - b.requests) / secs,
                (t.tokens - b.tokens) / secs,
                (t.refused - b.refused) / secs,
                t.cost_micros,
            )
        })
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let mut out = format!(
        "tollgate top — {url} — {} keys\n\n{:<24} {:>10} {:>12} {:>10} {:>14}\n",
        rows.len(),
        "KEY",
        "REQ/S",
        "TOKENS/S",
        "REFUSED/S",
        "SPEND (USD)"
    );
    for (key, rps, tps, refused, cost) in rows {
        out.push_str(&format!(
            "{:<24} {:>10.1} {:>12.1} {:>10.1} {:>14.6}\n",
            key.chars().take(24).collect::<String>(),
            rps,
            tps,
            refused,
            cost / 1e6
        ));
    }
    out
}

/// Runs `tollgate top`.
pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let url = format!("{}/metrics", args.url.trim_end_matches('/'));
    // The workspace builds reqwest without a default crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let scrape = || async {
        let resp = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        anyhow::ensure!(
            resp.status().is_success(),
            "{url} answered {}",
            resp.status()
        );
        Ok::<_, anyhow::Error>((Instant::now(), totals(&resp.text().await?)))
    };
    let mut before = scrape().await?;
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut shown = 0;
    while args.iterations.is_none_or(|n| shown < n) {
        tokio::time::sleep(args.every).await;
        let now = scrape().await?;
        let text = frame(&args.url, &now.1, &before.1, now.0 - before.0);
        let mut stdout = std::io::stdout().lock();
        if interactive {
            // Home and clear: redraw in place.
            write!(stdout, "\x1b[H\x1b[2J")?;
        }
        write!(stdout, "{text}")?;
        if !interactive {
            writeln!(stdout)?;
        }
        stdout.flush()?;
        before = now;
        shown += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP tollgate_requests_total API requests
# TYPE tollgate_requests_total counter
tollgate_requests_total{key="web",model="gpt-4o",status="200",decision="admitted"} 10
tollgate_requests_total{key="web",model="gpt-4o",status="429",decision="rate_limited"} 4
tollgate_requests_total{key="we\"ird,key",model="other",status="404",decision="rejected"} 1
tollgate_tokens_total{key="web",model="gpt-4o",direction="input"} 300
tollgate_tokens_total{key="web",model="gpt-4o",direction="output"} 200
tollgate_cost_micro_usd_total{key="web",model="gpt-4o"} 1500
tollgate_ledger_batch_rows_sum 12
"#;

    #[test]
    fn reads_per_key_totals() {
        let t = totals(TEXT);
        assert_eq!(
            t["web"],
            KeyTotals {
                requests: 14.0,
                refused: 4.0,
                tokens: 500.0,
                cost_micros: 1500.0
            }
        );
        assert_eq!(t["we\"ird,key"].requests, 1.0);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn rates_are_deltas_over_the_interval() {
        let now = totals(TEXT);
        let mut before = now.clone();
        if let Some(w) = before.get_mut("web") {
            w.requests -= 10.0;
            w.tokens -= 400.0;
        }
        let f = frame("http://gw", &now, &before, Duration::from_secs(2));
        let web = f.lines().find(|l| l.starts_with("web")).expect("row");
        let cols: Vec<&str> = web.split_whitespace().collect();
        assert_eq!(cols, ["web", "5.0", "200.0", "0.0", "0.001500"]);
    }
}
