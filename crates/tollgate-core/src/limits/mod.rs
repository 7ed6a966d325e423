//! Limits: rolling windows decided by GCRA.

pub mod gcra;

pub use gcra::{Admitted, Gcra, Refused};
