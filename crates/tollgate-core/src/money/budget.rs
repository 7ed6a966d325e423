//! Budgets: a cap on what a scope may spend over a window.

use super::{Micros, Window};
use serde::Serialize;
use std::sync::Arc;

/// A spend cap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Budget {
    /// `org`, `team:T`, `key:NAME`, `user:ID`, or `user:*` (every end user,
    /// each on their own).
    pub scope: Arc<str>,
    /// What the spend is counted over.
    pub window: Window,
    /// The cap, micro-USD.
    pub cap: Micros,
    /// Spend share (percent) at which an alert is raised once per window.
    pub alert_percent: Option<u8>,
}

/// The scope every end user without a budget of their own falls under.
pub const EVERY_USER: &str = "user:*";

/// Checks that `scope` is one a budget can cap.
pub fn check_scope(scope: &str) -> Result<(), String> {
    if scope == "org" {
        return Ok(());
    }
    match scope.split_once(':') {
        Some(("team" | "key" | "user", name)) if !name.is_empty() => Ok(()),
        _ => Err(format!(
            "`{scope}` is not a budget scope (org, team:NAME, key:NAME, user:ID or user:*)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        for ok in [
            "org",
            "team:search",
            "key:prod-web",
            "user:alice",
            EVERY_USER,
        ] {
            assert_eq!(check_scope(ok), Ok(()), "{ok}");
        }
        for bad in ["", "team:", "account:x", "everyone"] {
            assert!(check_scope(bad).is_err(), "{bad}");
        }
    }
}
