//! The resilient client half of Tollgate's playbook, for OpenAI-compatible
//! endpoints (OpenAI, Azure OpenAI, Tollgate, any compatible server).
//!
//! - [`classify`] reads an answer (status, headers, body) into a
//!   [`Disposition`]: retry after what the server said, back off, stop on a
//!   budget, top up, wait for a daily reset, or fail fast.
//! - [`RetryPolicy`] turns a disposition into a wait: the server's advice
//!   always wins; otherwise full jitter, within attempts and a time budget.
//! - [`Pacer`] keeps a client under RPM and TPM on purpose: each request
//!   reserves the moment it fits, corrected by the server's headers.
//! - [`Error`] says what to do, not just what happened.

pub mod classify;
mod client;
mod error;
pub mod pacer;
pub mod retry;

pub use classify::{Disposition, classify, retry_after};
pub use client::{Answer, Client, ClientConfig, Counters};
pub use error::Error;
pub use pacer::Pacer;
pub use retry::RetryPolicy;
pub use tollgate_core::ErrorType;
