//! The resilient client for OpenAI-compatible APIs: classify every answer,
//! back off with jitter, pace under the limits, fall back. (Being built; the
//! vocabulary it will speak is `tollgate_core::error`.)

pub use tollgate_core::ErrorType;
