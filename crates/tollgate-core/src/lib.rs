//! Tollgate's pure decision logic: limits, GCRA, money and prices, token estimates, the
//! OpenAI wire shapes both ends of the gateway read, and the error taxonomy.
//!
//! Nothing in this crate does I/O or reads a clock by itself: time comes in as
//! a parameter or through [`clock::Clock`], so every decision is testable in
//! microseconds on a fake clock.

pub mod backoff;
pub mod clock;
pub mod duration;
pub mod error;
pub mod json;
pub mod limits;
pub mod money;
pub mod openai;
pub mod tokens;

pub use error::{ApiError, ErrorType};
