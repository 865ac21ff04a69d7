//! The error type of `dunite-oci`.

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the blob cache.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string is not a valid OCI digest.
    #[error("invalid digest: {0}")]
    InvalidDigest(#[from] crate::DigestError),
    /// The shared cache failed or refused the content: a digest or size mismatch, a truncated
    /// stream, a blob over the cap, an I/O or database error. See the core error's variants.
    #[error(transparent)]
    Cache(#[from] dunite_core::Error),
}

impl Error {
    /// The core error, when the cache itself failed or refused the content.
    #[must_use]
    pub fn as_cache(&self) -> Option<&dunite_core::Error> {
        match self {
            Self::Cache(e) => Some(e),
            Self::InvalidDigest(_) => None,
        }
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
