//! A URL-keyed, byte-capped cache of downloaded files, with fetch-through.
//!
//! [`DownloadCache`] keeps files fetched from `http`/`https` URLs under their canonical
//! [`UrlKey`], and stays under a byte cap through `dunite-core`'s [`DebouncedEvictor`].
//! [`get_or_fetch`](DownloadCache::get_or_fetch) serves a fresh cached entry, or fetches the
//! URL through a [`Fetcher`] you supply (the crate brings no HTTP client):
//!
//! - **Single flight**: concurrent requests for one URL share one upstream transfer, and every
//!   caller gets the content or the same error. The transfer runs on its own task, so it
//!   finishes (and is cached) even if the caller that started it goes away.
//! - **Verification**: an expected SHA-256 and a reported `Content-Length` are checked as the
//!   body streams to disk; a mismatch, a truncated or cut stream is a typed error and caches
//!   nothing.
//! - **Revalidation**: an entry older than the cache's freshness is revalidated with its
//!   `ETag` / `Last-Modified`; "not modified" refreshes it without a transfer.
//!
//! Storage (the metadata, in embedded SQLite or a shared PostgreSQL, the payload directory,
//! the crash-safe store sequence, reconciliation, eviction) is `dunite-core`'s
//! [`EntryCache`]; this crate adds only what is particular to downloads. Readers keep their complete bytes even if the entry is
//! evicted or replaced while they read.
//!
//! [`DebouncedEvictor`]: dunite_core::DebouncedEvictor
//! [`EntryCache`]: dunite_core::EntryCache
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//!
//! use dunite_core::{ContentDigest, DigestAlgorithm, EvictionPolicy};
//! use dunite_download::{
//!     DownloadCache, DownloadRequest, FetchError, Fetched, ResponseMeta, Source, UrlKey, fetch_fn,
//! };
//! use tokio::io::AsyncReadExt as _;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! // 1 GiB cap; entries are served for an hour before being revalidated. Needs a Tokio runtime.
//! let options = DownloadCache::options(dir.path(), EvictionPolicy::new(1 << 30));
//! let cache = DownloadCache::new(options, Duration::from_secs(3600)).await?;
//!
//! // A stand-in for an HTTP client: answers every URL with a small body.
//! let upstream = fetch_fn(|request| async move {
//!     if request.validators().is_some_and(|v| v.etag() == Some("\"v1\"")) {
//!         return Ok::<_, FetchError>(Fetched::not_modified());
//!     }
//!     let body = b"#!/bin/sh\necho hello\n".to_vec();
//!     let meta = ResponseMeta::new()
//!         .with_content_type("text/x-shellscript")
//!         .with_etag("\"v1\"")
//!         .with_content_length(body.len() as u64);
//!     Ok(Fetched::body(std::io::Cursor::new(body), meta))
//! });
//!
//! let url: UrlKey = "HTTPS://Example.com:443/install.sh#top".parse()?;
//! assert_eq!(url.as_str(), "https://example.com/install.sh");
//! let request = DownloadRequest::new(url.clone())
//!     .with_sha256(ContentDigest::of(DigestAlgorithm::Sha256, b"#!/bin/sh\necho hello\n"));
//!
//! let mut first = cache.get_or_fetch(&request, &upstream).await?;
//! assert_eq!(first.source(), Source::Fetched);
//! let mut script = String::new();
//! first.file_mut().read_to_string(&mut script).await?;
//! assert_eq!(script, "#!/bin/sh\necho hello\n");
//!
//! // The second request is served from disk.
//! let second = cache.get_or_fetch(&request, &upstream).await?;
//! assert_eq!(second.source(), Source::Hit);
//! assert_eq!(second.info().etag(), Some("\"v1\""));
//! assert_eq!(second.info().content_type(), Some("text/x-shellscript"));
//!
//! // Content that does not match the expected digest is refused and not cached.
//! let other: UrlKey = "https://example.com/other.sh".parse()?;
//! let wrong = DownloadRequest::new(other.clone()).with_sha256(ContentDigest::of(DigestAlgorithm::Sha256, b"x"));
//! assert!(cache.get_or_fetch(&wrong, &upstream).await.is_err());
//! assert!(!cache.contains(&other).await?);
//! assert_eq!(cache.len().await?, 1);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod cache;
mod error;
mod fetch;
mod fill;
mod key;

pub use cache::{
    Download, DownloadCache, DownloadInfo, DownloadRequest, DownloadStats, Lookup, NAMESPACE, Source,
    recorded_sha256,
};
pub use error::{Error, Result};
pub use fetch::{
    Body, FetchError, FetchFn, FetchRequest, Fetched, Fetcher, ResponseMeta, Validators, fetch_fn,
};
pub use fill::DownloadHead;
pub use key::{UrlError, UrlKey};
