//! The error type of `dunite-core`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// A boxed error from an [`EvictionStore`](crate::EvictionStore) implementation.
pub type BoxError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the evictor.
///
/// Errors are cheap to clone (causes are reference-counted) because one explicit pass can
/// answer several waiting callers at once.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The evictor was created outside a Tokio runtime.
    #[error("no Tokio runtime: a DebouncedEvictor must be spawned from inside a Tokio runtime")]
    NoRuntime,
    /// The policy is inconsistent.
    #[error("invalid eviction policy: {0}")]
    InvalidPolicy(&'static str),
    /// A call to the eviction store failed.
    #[error("eviction store failed to {op}{}", EntrySuffix(.key.as_deref()))]
    Store {
        /// The call that failed.
        op: StoreOp,
        /// The entry the call was about, if any.
        key: Option<String>,
        /// The store's own error.
        #[source]
        source: BoxError,
    },
    /// The store panicked during a pass; the evictor caught the panic and lives on.
    #[error("eviction store panicked during a pass")]
    Panicked,
    /// The evictor task is gone (the runtime shut down).
    #[error("the evictor task has stopped")]
    Stopped,
    /// A database operation failed.
    #[error("database error while trying to {op}")]
    Database {
        /// What was being done.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: Arc<sqlx::Error>,
    },
    /// A file-system operation on the cache's own files failed (a full disk shows up here).
    #[error("i/o error while trying to {op} {}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Reading the stream being stored failed (for example, an upstream cut the connection).
    #[error("reading the source stream failed after {received} bytes")]
    Source {
        /// Bytes received before the failure.
        received: u64,
        /// The reader's error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// An entry would exceed the cache's byte cap on its own.
    #[error("entry of {size} bytes (or more) exceeds the cache cap of {max_bytes} bytes")]
    TooLarge {
        /// The entry's size, or the bytes received when the cap was crossed.
        size: u64,
        /// The cap.
        max_bytes: u64,
    },
    /// The stream ended before the expected size.
    #[error("stream truncated: got {received} of {expected} bytes")]
    Truncated {
        /// The size the caller said to expect.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// The stream was longer than the expected size.
    #[error("size mismatch: expected {expected} bytes, got more")]
    TooLong {
        /// The size the caller said to expect.
        expected: u64,
    },
    /// The content's digest is not the expected one.
    #[error("digest mismatch: expected {expected}, computed {actual}")]
    DigestMismatch {
        /// The expected digest.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// A configuration value is unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Pinning the entry would make the pinned entries larger than the cache's cap (pinned
    /// entries are never evicted and count against the cap); nothing was pinned.
    #[error("pinning {size} bytes would pin {pinned} bytes, more than the cache cap of {max_bytes} bytes")]
    PinsExceedCap {
        /// The entry's size.
        size: u64,
        /// What the pinned entries would add up to.
        pinned: u64,
        /// The cap.
        max_bytes: u64,
    },
}

/// Which [`EvictionStore`](crate::EvictionStore) or [`EvictionPass`](crate::EvictionPass)
/// call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreOp {
    /// [`EvictionStore::begin_pass`](crate::EvictionStore::begin_pass).
    BeginPass,
    /// [`EvictionPass::total_size_bytes`](crate::EvictionPass::total_size_bytes).
    TotalSize,
    /// [`EvictionPass::least_recently_used`](crate::EvictionPass::least_recently_used).
    SelectVictims,
    /// [`EvictionPass::remove`](crate::EvictionPass::remove).
    Remove,
    /// [`EvictionPass::finish`](crate::EvictionPass::finish).
    FinishPass,
}

impl fmt::Display for StoreOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BeginPass => "begin a pass",
            Self::TotalSize => "read the accounted total",
            Self::SelectVictims => "select least-recently-used entries",
            Self::Remove => "remove an entry",
            Self::FinishPass => "finish a pass",
        })
    }
}

struct EntrySuffix<'a>(Option<&'a str>);

impl fmt::Display for EntrySuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(key) => write!(f, " (entry {key})"),
            None => Ok(()),
        }
    }
}

impl Error {
    /// Whether this is a file-system error caused by a full disk (`ENOSPC`).
    #[must_use]
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
    }

    /// Whether the metadata database failed (unreachable, timed out, refused the statement).
    #[must_use]
    pub fn is_database(&self) -> bool {
        matches!(self, Self::Database { .. })
    }

    /// Whether this is the pool's `PoolTimedOut`: every connection was busy for the whole
    /// acquire timeout. A pool that could not connect at all reports an unreachable database
    /// instead (see [`is_database_unavailable`](Self::is_database_unavailable)).
    #[must_use]
    pub fn is_pool_timeout(&self) -> bool {
        matches!(self, Self::Database { source, .. } if matches!(**source, sqlx::Error::PoolTimedOut))
    }

    /// Whether the metadata database failed other than by being busy: unreachable, or
    /// refusing the statement. A cache may then fall back to what it can do without it (serve
    /// a content-addressed payload verified on disk); a busy pool
    /// ([`is_pool_timeout`](Self::is_pool_timeout)) is better waited for or answered with a
    /// retry, since the fallback costs a full read of the payload.
    #[must_use]
    pub fn is_database_unavailable(&self) -> bool {
        self.is_database() && !self.is_pool_timeout()
    }

    pub(crate) fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Database { op, source: Arc::new(source) }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source: Arc::new(source) }
    }

    pub(crate) fn store<E>(op: StoreOp, key: Option<&str>, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Self::Store { op, key: key.map(str::to_owned), source: Arc::new(source) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_static() {
        fn assert_bounds<T: Send + Sync + 'static + std::error::Error>() {}
        assert_bounds::<Error>();
    }

    #[test]
    fn store_error_names_the_operation_and_entry() {
        let err = Error::store(StoreOp::Remove, Some("sha256:ab"), std::io::Error::other("disk gone"));
        assert_eq!(err.to_string(), "eviction store failed to remove an entry (entry sha256:ab)");
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("disk gone"));
    }
}
