//! The benchmark scenarios, one module each.

pub mod burst;
pub mod eviction;
pub mod hits;
pub mod http;
pub mod large;
pub mod scale;
pub mod small;

use std::future::Future;
use std::pin::Pin;

use crate::report::Record;
use crate::{Result, Settings};

/// A scenario's future: every record it produced.
pub type Run = Pin<Box<dyn Future<Output = Result<Vec<Record>>>>>;

/// A named scenario.
pub struct Scenario {
    pub name: &'static str,
    pub run: fn(Settings) -> Run,
}

/// Every scenario, in the order they run.
pub const ALL: &[Scenario] = &[
    Scenario { name: "burst", run: |s| Box::pin(burst::run(s)) },
    Scenario { name: "large-blob", run: |s| Box::pin(large::run(s)) },
    Scenario { name: "small-blob", run: |s| Box::pin(small::run(s)) },
    Scenario { name: "eviction", run: |s| Box::pin(eviction::run(s)) },
    Scenario { name: "hits", run: |s| Box::pin(hits::run(s)) },
    Scenario { name: "http", run: |s| Box::pin(http::run(s)) },
    Scenario { name: "scale", run: |s| Box::pin(scale::run(s)) },
];
