//! The error type of `dunite-core`.

use std::fmt;
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
}

impl fmt::Display for StoreOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BeginPass => "begin a pass",
            Self::TotalSize => "read the accounted total",
            Self::SelectVictims => "select least-recently-used entries",
            Self::Remove => "remove an entry",
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
