//! The offline check of a data directory (`dunite check`): every cache's rows, accounted
//! total and payload files agree, and payloads hash to what their rows say. The logic is the
//! core's ([`EntryStore::check`]); this file knows which caches a data directory holds and
//! what each kind's payloads must hash to.
//!
//! Run it while no server uses the directory: it opens the database itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dunite_core::{
    CheckOptions, CheckProgress, CheckReport, ContentDigest, Database, DatabaseOptions, EntryStore,
    ExpectedDigest, Repair, Verify,
};

/// One cache of a data directory.
struct Cache {
    /// The name `dunite admin` and the reports use.
    name: &'static str,
    namespace: &'static str,
    /// Under the data directory.
    dir: &'static str,
    /// What a row says its payload must hash to.
    expected: fn(&str, &str) -> Option<ContentDigest>,
}

/// Blobs and manifests are keyed by their digest.
fn digest_key(key: &str, _meta: &str) -> Option<ContentDigest> {
    key.parse::<dunite_oci::Digest>().ok().map(|digest| digest.content_digest().clone())
}

/// A download's row records its SHA-256.
fn recorded_sha256(_key: &str, meta: &str) -> Option<ContentDigest> {
    dunite_download::recorded_sha256(meta)
}

/// A tag record says nothing its bytes must hash to.
fn nothing(_key: &str, _meta: &str) -> Option<ContentDigest> {
    None
}

const CACHES: [Cache; 4] = [
    Cache { name: "blobs", namespace: dunite_oci::NAMESPACE, dir: "blobs", expected: digest_key },
    Cache {
        name: "manifests",
        namespace: dunite_oci::MANIFEST_NAMESPACE,
        dir: "manifests",
        expected: digest_key,
    },
    Cache { name: "tags", namespace: dunite_oci::TAG_NAMESPACE, dir: "tags", expected: nothing },
    Cache {
        name: "downloads",
        namespace: dunite_download::NAMESPACE,
        dir: "downloads",
        expected: recorded_sha256,
    },
];

/// Given a cache's name before it is checked, what to call with its hashing progress.
pub type ProgressPerCache = dyn Fn(&str) -> Arc<CheckProgress> + Send + Sync;

/// What [`check_data_dir`] checks and does.
#[derive(Clone, Default)]
pub struct CheckRun {
    /// Which payloads to hash.
    pub verify: Verify,
    /// Whether to repair.
    pub repair: Repair,
    /// Called with each cache's name before it is checked, returning its hashing progress.
    pub progress: Option<Arc<ProgressPerCache>>,
}

impl std::fmt::Debug for CheckRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckRun")
            .field("verify", &self.verify)
            .field("repair", &self.repair)
            .finish_non_exhaustive()
    }
}

/// Why a data directory could not be checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The directory holds no database (and no URL was given): nothing to check.
    #[error("no metadata database at {0} (is this a dunite data directory?)")]
    NoDatabase(PathBuf),
    /// A server (or another check) on this host is using the directory.
    #[error("{0} is in use by a running dunite (stop it first; the lock is {1})")]
    InUse(PathBuf, PathBuf),
    /// The lock file could not be opened.
    #[error("cannot open the lock file {0}: {1}")]
    Lock(PathBuf, #[source] std::io::Error),
    /// The database or a cache's directory could not be read, or a repair failed.
    #[error(transparent)]
    Cache(#[from] dunite_core::Error),
}

/// Check every cache of the data directory `data_dir` (its metadata in `database_url`, or
/// in `data_dir/metadata.db`), as `run` says; one report per cache, by its name.
///
/// Requires a Tokio runtime, and that no server uses the directory meanwhile: the check
/// takes the directory's lock alone and refuses to run while a server on this host holds it
/// (servers sharing the directory from other hosts must be stopped by the operator).
///
/// # Errors
///
/// [`CheckError`] if the directory is in use, the database cannot be opened or a cache
/// cannot be read or repaired.
pub async fn check_data_dir(
    data_dir: &Path,
    database_url: Option<&str>,
    run: &CheckRun,
) -> Result<Vec<(&'static str, CheckReport)>, CheckError> {
    let lock_path = crate::dirlock::path(data_dir);
    let _lock = match crate::dirlock::DirLock::exclusive(data_dir) {
        Ok(Some(lock)) => lock,
        Ok(None) => return Err(CheckError::InUse(data_dir.to_owned(), lock_path)),
        // No directory, or not writable: checked (and reported) below as before.
        Err(_) if !data_dir.join("metadata.db").exists() && database_url.is_none() => {
            return Err(CheckError::NoDatabase(data_dir.join("metadata.db")));
        }
        Err(error) => return Err(CheckError::Lock(lock_path, error)),
    };
    let options = DatabaseOptions::new().with_max_connections(2);
    let database = match database_url {
        Some(url) => Database::connect(url, &options).await?,
        None => {
            let path = data_dir.join("metadata.db");
            if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
                return Err(CheckError::NoDatabase(path));
            }
            Database::open_sqlite(&path, &options).await?
        }
    };
    let mut reports = Vec::with_capacity(CACHES.len());
    for cache in CACHES {
        let dir = data_dir.join(cache.dir);
        if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            continue;
        }
        let store = EntryStore::open_for_check(database.clone(), cache.namespace, &dir).await?;
        let expected = cache.expected;
        let expected: Arc<ExpectedDigest> = Arc::new(move |key: &str, meta: &str| expected(key, meta));
        let mut options = CheckOptions::new().with_verify(run.verify, expected).with_repair(run.repair);
        if let Some(progress) = &run.progress {
            options = options.with_progress(progress(cache.name));
        }
        reports.push((cache.name, store.check(&options).await?));
    }
    database.pool().close().await;
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_a_server_uses_is_not_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metadata.db"), b"").unwrap();
        let server = crate::dirlock::DirLock::shared(dir.path()).unwrap().unwrap();
        let refused = check_data_dir(dir.path(), None, &CheckRun::default()).await.unwrap_err();
        assert!(matches!(refused, CheckError::InUse(..)), "{refused}");
        drop(server);
    }
}
