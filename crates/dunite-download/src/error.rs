//! The error type of `dunite-download`.

use std::sync::Arc;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the download cache.
///
/// Cheap to clone (causes are reference-counted): every caller waiting on one shared fetch
/// gets the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string is not a usable download URL.
    #[error(transparent)]
    InvalidUrl(#[from] crate::UrlError),
    /// An expected digest is not SHA-256, the digest downloads are recorded with.
    #[error("downloads are verified with sha256, not {algorithm}")]
    UnsupportedDigest {
        /// The expected digest's algorithm.
        algorithm: &'static str,
    },
    /// The fetcher failed (connection refused, an HTTP error status, ...). Nothing was stored.
    #[error("fetching {url} failed")]
    Fetch {
        /// The URL being fetched, as [`UrlKey::redacted`](crate::UrlKey::redacted) shows it.
        url: String,
        /// The fetcher's error.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The fetcher answered "not modified" to a request that carried no validators, or for an
    /// entry that is no longer cached.
    #[error("the fetcher answered \"not modified\" for {url}, but there was no cached entry to keep")]
    UnexpectedNotModified {
        /// The URL being fetched, as [`UrlKey::redacted`](crate::UrlKey::redacted) shows it.
        url: String,
    },
    /// The shared fetch ended without an answer: the fetcher panicked or the runtime shut
    /// down. Nothing was stored.
    #[error("the fetch of {url} was aborted (the fetcher panicked or the runtime shut down)")]
    FetchAborted {
        /// The URL being fetched, as [`UrlKey::redacted`](crate::UrlKey::redacted) shows it.
        url: String,
    },
    /// The entry was removed or replaced between its fetch and its opening, on every attempt
    /// (an explicit [`remove`](crate::DownloadCache::remove) racing the fetches).
    #[error("the entry for {url} vanished before it could be opened, repeatedly")]
    Vanished {
        /// The URL being fetched, as [`UrlKey::redacted`](crate::UrlKey::redacted) shows it.
        url: String,
    },
    /// The entry's metadata could not be encoded.
    #[error("could not encode download metadata")]
    Metadata(#[source] Arc<serde_json::Error>),
    /// The shared cache failed or refused the content: a digest mismatch, a truncated or cut
    /// stream, a download over the cap, an I/O or database error. See the core error's
    /// variants.
    #[error(transparent)]
    Cache(#[from] dunite_core::Error),
}

impl Error {
    /// The core error, when the cache itself failed or refused the content.
    #[must_use]
    pub fn as_cache(&self) -> Option<&dunite_core::Error> {
        match self {
            Self::Cache(e) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn fetch(url: &crate::UrlKey, source: crate::FetchError) -> Self {
        Self::Fetch { url: url.redacted(), source: Arc::from(source) }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_is_send_sync_static_and_clone() {
        fn assert_bounds<T: Send + Sync + 'static + Clone + std::error::Error>() {}
        assert_bounds::<super::Error>();
    }

    #[test]
    fn errors_show_urls_without_their_query_or_credentials() {
        let key = crate::UrlKey::parse("https://user:pw@files.example/f?token=SECRET").unwrap();
        let error = super::Error::fetch(&key, "connection refused".into());
        let text = error.to_string();
        assert_eq!(text, "fetching https://files.example/f?REDACTED failed");
        assert!(!text.contains("SECRET") && !text.contains("pw"), "{text}");
    }
}
