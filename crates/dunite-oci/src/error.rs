//! The error type of `dunite-oci`.

use std::sync::Arc;

use crate::Digest;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the blob, manifest and tag caches.
///
/// Cheap to clone (causes are reference-counted).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string is not a valid OCI digest.
    #[error("invalid digest: {0}")]
    InvalidDigest(#[from] crate::DigestError),
    /// The shared cache failed or refused the content: a digest or size mismatch, a truncated
    /// stream, content over the cap, an I/O or database error. See the core error's variants.
    #[error(transparent)]
    Cache(#[from] dunite_core::Error),
    /// An open cached payload could not be read (a manifest is read whole).
    #[error("i/o error while trying to read the cached {what} {digest}")]
    Read {
        /// What was read: `manifest`.
        what: &'static str,
        /// Its digest.
        digest: Digest,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl Error {
    /// The core error, when the cache itself failed or refused the content.
    #[must_use]
    pub fn as_cache(&self) -> Option<&dunite_core::Error> {
        match self {
            Self::Cache(e) => Some(e),
            Self::InvalidDigest(_) | Self::Read { .. } => None,
        }
    }

    /// Whether the metadata database failed (unreachable, busy, or refusing the statement):
    /// content verified before its commit was not recorded. See
    /// [`dunite_core::Error::is_database`].
    #[must_use]
    pub fn is_database(&self) -> bool {
        self.as_cache().is_some_and(dunite_core::Error::is_database)
    }

    /// Whether every pooled database connection stayed busy for the whole acquire timeout:
    /// no outage, a request to retry. See [`dunite_core::Error::is_pool_timeout`].
    #[must_use]
    pub fn is_pool_timeout(&self) -> bool {
        self.as_cache().is_some_and(dunite_core::Error::is_pool_timeout)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_is_send_sync_static() {
        fn assert_bounds<T: Send + Sync + 'static + std::error::Error>() {}
        assert_bounds::<super::Error>();
    }
}
