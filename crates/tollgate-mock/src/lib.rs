//! `tollgate mock`: a simulated OpenAI-compatible provider.
//!
//! It answers like OpenAI does — same bodies, same headers, same rate-limit
//! semantics (GCRA per API key, `x-ratelimit-*`, the 429 wording) — with
//! deterministic output whose length follows `max_tokens`, a latency model,
//! and faults injected for the whole process or per request through the
//! `x-mock-fault` header. Tests start it in-process on an ephemeral port;
//! `tollgate mock` runs it standalone.

mod config;
mod fault;
mod handlers;
mod limits;
mod server;
mod stats;
mod text;

pub use config::MockConfig;
pub use fault::{FAULT_HEADER, Fault};
pub use server::MockServer;
pub use stats::{MockStats, StatsSnapshot};
pub use text::generate_words;

/// Errors of the mock itself (not the errors it simulates).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be opened.
    #[error("mock provider could not listen on {addr}: {source}")]
    Bind {
        /// Address asked for.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A fault specification did not parse.
    #[error(
        "unknown fault `{0}` (expected 500, 502, 503, 429[:DELAY], overload, hang, trickle[:DELAY], reset, truncated, malformed, cut[:N], insufficient_quota)"
    )]
    UnknownFault(String),
}
