//! Real servers beside dunite, for end-to-end tests and the HTTP benchmarks: Debian's
//! distribution registry (plain, or as a pull-through proxy), nginx (static files with
//! `sendfile`, and a `proxy_cache`), and the `dunite` binary itself.
//!
//! Each starts on a free loopback port with its configuration in a temporary directory,
//! is ready (answering HTTP) when `start` returns, and is stopped when dropped (SIGTERM, then
//! SIGKILL after a deadline), so a failed test or benchmark leaves no process behind.
//! [`push`] seeds a registry through its HTTP API.

mod dunite;
mod error;
mod nginx;
mod process;
pub mod push;
mod registry;

pub use dunite::{Dunite, DuniteOptions};
pub use error::PeerError;
pub use nginx::{Nginx, NginxOptions};
pub use process::{Process, ProcessUsage, free_addr, tool};
pub use registry::{Registry, RegistryMode};

/// A result of this module.
pub type Result<T, E = PeerError> = std::result::Result<T, E>;
