//! Why the server could not start: the one error [`App::open`](crate::App::open) and each
//! feature's `open` report.

use std::path::PathBuf;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A cache could not be opened.
    #[error("cannot open the cache: {0}")]
    Cache(#[from] dunite_core::Error),
    /// The blob, manifest or tag cache could not be opened.
    #[error("cannot open the OCI caches: {0}")]
    Blobs(#[from] dunite_oci::Error),
    /// The download cache could not be opened.
    #[error("cannot open the download cache: {0}")]
    Downloads(#[from] dunite_download::Error),
    /// The upstream client could not be built.
    #[error("cannot set up upstream access: {0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// A client user or token file could not be used.
    #[error("cannot read the client credentials: {0}")]
    Auth(#[from] crate::auth::AuthFileError),
    /// `dunite check` holds the data directory's lock.
    #[error("the data directory is being checked (`dunite check` holds {0}); start when it is done")]
    InUse(PathBuf),
    /// A directory could not be prepared.
    #[error("cannot prepare {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}
