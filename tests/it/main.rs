//! Cross-crate and end-to-end tests, one binary with a module per concern.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests report failure by panicking")]

mod chaos;
mod disk_full;
mod e2e;
mod hostile;
mod rig;
mod soak;
mod tidy;
