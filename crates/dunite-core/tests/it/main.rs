//! Integration tests of the debounced evictor and the entry cache: one binary, one module per
//! concern.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests report failure by panicking")]

mod burst;
mod contract;
mod convergence;
mod faults;
mod fill;
mod leases;
mod lifecycle;
mod operators;
mod reads;
mod simulation;
mod slow_db;
mod support;
