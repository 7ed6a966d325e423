//! Errors that tell the caller what to do next.

use crate::classify::Disposition;
use std::time::{Duration, SystemTime};

/// Why a request did not succeed, worded as the next step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spend cap is used up.
    #[error("budget for {scope} exhausted{} — raise the cap or wait", until_text(*.until))]
    BudgetExhausted {
        /// The scope that hit its cap.
        scope: String,
        /// When its window resets; `None` for a lifetime budget.
        until: Option<SystemTime>,
    },
    /// The prepaid balance cannot pay.
    #[error("the balance of {account} cannot pay for this request — top up the account")]
    TopUp {
        /// The account, or the provider's quota.
        account: String,
    },
    /// A daily cap was reached.
    #[error("daily cap reached until {} — wait for the reset or raise the cap", humantime::format_rfc3339_seconds(*.until))]
    DailyCap {
        /// The next reset.
        until: SystemTime,
    },
    /// The server refused in a way retrying cannot change.
    #[error("HTTP {status} {code}: {message} — fix the request or the key; retrying will not help")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// `error.code` (or type).
        code: String,
        /// `error.message`.
        message: String,
    },
    /// The client is set up wrong.
    #[error("client configuration: {0}")]
    Config(String),
    /// Retries ran out.
    #[error(
        "gave up after {attempts} attempts in {elapsed:?}; the last answer was HTTP {status}: {message}"
    )]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last status (0 when the connection failed).
        status: u16,
        /// The last error message.
        message: String,
    },
}

impl Error {
    /// Whether another model might succeed where this one failed: retries
    /// ran out (the model's deployment is down or overloaded), or the model
    /// does not exist (retired, misspelt for this server). Budgets, balances
    /// and bad requests are not the model's fault.
    pub fn model_may_fall_back(&self) -> bool {
        match self {
            Error::GaveUp { .. } => true,
            Error::Rejected { status, code, .. } => *status == 404 && code == "model_not_found",
            _ => false,
        }
    }
}

fn until_text(until: Option<SystemTime>) -> String {
    until.map_or_else(
        || " for good (a lifetime budget)".to_owned(),
        |t| format!(" until {}", humantime::format_rfc3339_seconds(t)),
    )
}

impl Error {
    /// The error for a final (non-retryable) disposition of an answer with
    /// `status` and error body `body`, at wall time `now`; `None` for
    /// [`Disposition::Done`] and retryable dispositions.
    pub fn from_disposition(
        d: &Disposition,
        status: u16,
        body: &[u8],
        now: SystemTime,
    ) -> Option<Self> {
        let fields: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let e = &fields["error"];
        let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
        Some(match d {
            Disposition::Done | Disposition::RetryAfter(_) | Disposition::Backoff => return None,
            Disposition::StopBudget { scope, resets_in } => Error::BudgetExhausted {
                scope: scope.clone().unwrap_or_else(|| "this key".into()),
                until: resets_in.map(|d| now + d),
            },
            Disposition::TopUp { account } => Error::TopUp {
                account: account
                    .clone()
                    .unwrap_or_else(|| "the provider account".into()),
            },
            Disposition::DailyCapUntil(d) => Error::DailyCap { until: now + *d },
            Disposition::FailFast => Error::Rejected {
                status,
                code: Some(text("code"))
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| text("type")),
                message: text("message"),
            },
        })
    }
}
