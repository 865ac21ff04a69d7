//! The data directory's lock (`DATA_DIR/.lock`, `flock(2)`): every server holds it shared
//! while it runs, `dunite check` exclusively, so a check never reads (or repairs) a cache a
//! server on this host is writing. The kernel drops the lock with the process, however it
//! ends. It does not reach other hosts sharing the directory (with PostgreSQL): stop those
//! too before a check.

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

/// A held lock on a data directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

/// The lock file of `data_dir`.
pub(crate) fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(".lock")
}

impl DirLock {
    /// Hold `data_dir`'s lock shared (a server; several may), or `None` if a check holds it.
    ///
    /// # Errors
    ///
    /// If the lock file cannot be opened.
    pub(crate) fn shared(data_dir: &Path) -> std::io::Result<Option<Self>> {
        Self::take(data_dir, FlockOperation::NonBlockingLockShared)
    }

    /// Hold `data_dir`'s lock alone (a check), or `None` if a server (or a check) holds it.
    ///
    /// # Errors
    ///
    /// If the lock file cannot be opened.
    pub(crate) fn exclusive(data_dir: &Path) -> std::io::Result<Option<Self>> {
        Self::take(data_dir, FlockOperation::NonBlockingLockExclusive)
    }

    fn take(data_dir: &Path, operation: FlockOperation) -> std::io::Result<Option<Self>> {
        let file =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path(data_dir))?;
        match flock(&file, operation) {
            Ok(()) => Ok(Some(Self { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(errno) => Err(errno.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_share_the_lock_and_a_check_waits_for_none() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::shared(dir.path()).unwrap().expect("free");
        let second = DirLock::shared(dir.path()).unwrap().expect("servers share it");
        assert!(DirLock::exclusive(dir.path()).unwrap().is_none(), "a check while servers run");
        drop((first, second));
        let check = DirLock::exclusive(dir.path()).unwrap().expect("no server left");
        assert!(DirLock::shared(dir.path()).unwrap().is_none(), "a server while a check runs");
        drop(check);
    }
}
