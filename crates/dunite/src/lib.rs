//! `dunite`: a byte-capped pull-through OCI registry mirror and download proxy.
//!
//! The binary's library half, so tests and embedders can run the server in-process:
//! [`Config`] (flags, `DUNITE_*` variables, a TOML file), [`App::open`] (the caches on one
//! metadata database, the upstream client) and [`serve`] (or [`serve_tls`] with a
//! [`tls::ServerTls`]).
//!
//! Request flow (see `docs/server.md`): a client asks `GET /v2/<name>/blobs/<digest>`; a hit
//! streams the cached file (with `Range`); a miss joins the one upstream fill of that digest
//! (single-flight, `BlobCache::fill`), which spools the body in the cache's directory while
//! every waiting client streams it, verifies the digest before the last byte, and makes the
//! spool the cached blob by rename. Manifests by digest are immutable; tags
//! are revalidated after the tag TTL and served stale while the upstream is down.
//!
//! # Example
//!
//! ```no_run
//! use dunite::{App, Config, serve, shutdown_signal};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::new("dunite-data".into());
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! let app = App::open(config).await?;
//! serve(app, listener, shutdown_signal()).await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod admin;
mod app;
pub mod auth;
mod body;
pub mod check;
pub mod cli;
pub mod config;
mod dirlock;
mod dl;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod limits;
mod metrics;
pub mod net;
mod oci;
mod peer;
pub mod spec;
mod start;
pub mod tls;
pub mod upstream;

pub use app::{App, serve, serve_tls, shutdown_signal, wait_until_listening};
pub use metrics::CacheOutcome;
pub use start::StartError;

/// An error and its causes, `: `-separated ("i/o error while trying to write ...: No space
/// left on device"): what logs and client-facing messages show, since the cause is often the
/// part that says what to do.
///
/// ```
/// let io = std::io::Error::other("No space left on device");
/// let error = dunite::StartError::Io { path: "/data".into(), source: io };
/// assert!(dunite::error_chain(&error).ends_with("No space left on device"));
/// ```
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
pub use config::{Cli, Command, Config, ConfigError, ServeArgs};
