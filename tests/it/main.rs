//! Cross-crate and end-to-end tests, one binary with a module per concern.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests report failure by panicking")]

mod e2e;
mod tidy;
