//! Where a cache keeps its files, and the file operations of a store.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::Digest as _;
use tempfile::TempPath;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};

use super::faults::Faults;
use crate::hash::ContentDigest;
use crate::{DigestAlgorithm, Error, Result};

/// Read buffer of a store: memory per store is bounded by this, whatever the entry's size.
const CHUNK: usize = 256 * 1024;

/// The cache directory:
///
/// ```text
/// <root>/data/<hh>/<sha256(key) hex>-<unique>   payloads, named when stored, never reused
/// <root>/tmp/store-<random>                     payloads being written
/// ```
///
/// Payload names derive from a hash of the key, never from the key itself, so no key (a
/// digest, a URL) can steer a path.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    data: PathBuf,
    tmp: PathBuf,
    /// Injected faults (see [`Faults`]); the store's, shared.
    pub(crate) faults: std::sync::Arc<Faults>,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A random number per process: with the pid, the time and a counter, payload names stay
/// unique across hosts sharing one cache directory (where pids may repeat).
fn process_nonce() -> u64 {
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        use std::hash::{BuildHasher as _, Hasher as _};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish()
    })
}

impl Layout {
    pub(crate) async fn create(root: &Path) -> Result<Self> {
        let layout =
            Self { data: root.join("data"), tmp: root.join("tmp"), faults: std::sync::Arc::default() };
        for dir in [&layout.data, &layout.tmp] {
            tokio::fs::create_dir_all(dir).await.map_err(Error::io("create directory", dir))?;
        }
        Ok(layout)
    }

    pub(crate) fn data_dir(&self) -> &Path {
        &self.data
    }

    pub(crate) fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// The absolute path of a payload named `file` (relative, as stored in its row).
    pub(crate) fn payload(&self, file: &str) -> PathBuf {
        self.data.join(file)
    }

    /// Find, without the database, a payload of `key` holding exactly the bytes of `digest`.
    /// Every store names its file after the key's hash, so the candidates are the files of
    /// one shard with that prefix; each is read and hashed, newest first, until one matches.
    /// A match may be an orphan or an entry being removed: its bytes are still the right ones.
    pub(crate) async fn find_verified(
        &self,
        key: &str,
        digest: &ContentDigest,
    ) -> Result<Option<(tokio::fs::File, u64)>> {
        let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
        let shard = self.data.join(&hash[..2]);
        let prefix = format!("{hash}-");
        let (want, path) = (digest.clone(), shard.clone());
        let found = blocking(move || {
            let mut candidates = Vec::new();
            let entries = match std::fs::read_dir(&shard) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(UNIX_EPOCH);
                    candidates.push((modified, entry.path()));
                }
            }
            candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
            for (_, candidate) in candidates {
                let mut file = match std::fs::File::open(&candidate) {
                    Ok(file) => file,
                    // Removed since the listing.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                let mut hasher = want.algorithm().hasher();
                let mut buffer = vec![0u8; CHUNK];
                let mut size = 0u64;
                loop {
                    let n = std::io::Read::read(&mut file, &mut buffer)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buffer[..n]);
                    size += n as u64;
                }
                if hasher.finish() == want {
                    std::io::Seek::rewind(&mut file)?;
                    return Ok(Some((file, size)));
                }
            }
            Ok(None)
        })
        .await
        .map_err(Error::io("search", path))?;
        Ok(found.map(|(file, size)| (tokio::fs::File::from_std(file), size)))
    }

    /// A fresh, never-used relative payload name for `key`.
    fn new_payload_name(key: &str) -> String {
        let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let seq = UNIQUE.fetch_add(1, Ordering::Relaxed);
        format!("{}/{hash}-{nanos:x}{:x}{:x}{seq:x}", &hash[..2], std::process::id(), process_nonce())
    }

    /// Stream `reader` into a temporary file, hashing as it goes, and check it against
    /// `expected` and `max_bytes`. On any error the temporary file is already gone.
    pub(crate) async fn write_temp<R>(
        &self,
        reader: R,
        expected: &Expected,
        max_bytes: u64,
    ) -> Result<Written>
    where
        R: AsyncRead + Unpin,
    {
        check_declared_size(expected, max_bytes)?;
        let tmp = self.tmp.clone();
        let named = blocking(move || tempfile::Builder::new().prefix("store-").tempfile_in(&tmp))
            .await
            .map_err(Error::io("create a temporary file in", self.tmp.clone()))?;
        let (file, temp) = named.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let (size, digest) =
            verify_stream(reader, Some((&mut file, temp.as_ref())), expected, max_bytes).await?;
        file.sync_all().await.map_err(Error::io("sync", temp.to_path_buf()))?;
        drop(file);
        Ok(Written { temp, size, digest })
    }

    /// Verify a file already on disk against `expected` and `max_bytes`, reading it once and
    /// copying nothing, and sync it. On success the file belongs to the returned `Written`
    /// (moved into place by `persist`, or deleted if dropped); on an error it is left alone.
    pub(crate) async fn adopt(&self, path: &Path, expected: &Expected, max_bytes: u64) -> Result<Written> {
        check_declared_size(expected, max_bytes)?;
        let file = tokio::fs::File::open(path).await.map_err(Error::io("open", path))?;
        let (size, digest) = verify_stream(file, None, expected, max_bytes).await.map_err(|e| match e {
            Error::Source { source, .. } => Error::Io { op: "read", path: path.to_path_buf(), source },
            other => other,
        })?;
        let file =
            tokio::fs::OpenOptions::new().write(true).open(path).await.map_err(Error::io("open", path))?;
        file.sync_all().await.map_err(Error::io("sync", path))?;
        let temp = TempPath::try_from_path(path).map_err(Error::io("take over", path))?;
        Ok(Written { temp, size, digest })
    }

    /// Move a written payload into place under a fresh name and make the rename durable.
    /// Returns the relative name for the entry's row.
    pub(crate) async fn persist(&self, written: TempPath, key: &str) -> Result<String> {
        let name = Self::new_payload_name(key);
        let path = self.payload(&name);
        let dest = path.clone();
        blocking(move || {
            let dir =
                dest.parent().ok_or_else(|| std::io::Error::other("payload path without a directory"))?;
            std::fs::create_dir_all(dir)?;
            // Stamp it now: a rename keeps the modification time, and start-up cleanup on a
            // shared directory judges files without a row by their age (an adopted file
            // written long ago must not look like an old orphan while its commit waits).
            std::fs::OpenOptions::new().write(true).open(&*written)?.set_modified(SystemTime::now())?;
            match written.persist(&dest) {
                Ok(()) => {}
                // An adopted file on another file system: copy it over, then drop the original
                // (the returned TempPath deletes it).
                Err(e) if e.error.kind() == std::io::ErrorKind::CrossesDevices => {
                    let copied =
                        std::fs::copy(&e.path, &dest).and_then(|_| std::fs::File::open(&dest)?.sync_all());
                    if let Err(error) = copied {
                        let _ = std::fs::remove_file(&dest);
                        return Err(error);
                    }
                }
                Err(e) => return Err(e.error),
            }
            // The rename is durable only once the directory is. If it cannot be made so, the
            // payload goes: no row will name it.
            if let Err(error) = std::fs::File::open(dir).and_then(|dir| dir.sync_all()) {
                let _ = std::fs::remove_file(&dest);
                return Err(error);
            }
            Ok(())
        })
        .await
        .map_err(Error::io("move into place", path))?;
        Ok(name)
    }

    /// Delete a payload; one that is already gone is fine.
    pub(crate) async fn unlink(&self, file: &str) -> Result<()> {
        let path = self.payload(file);
        if self.faults.unlink_failed() {
            return Err(Error::io("delete", path)(super::faults::injected("unlink")));
        }
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("delete", path)(e)),
        }
    }
}

/// A payload written and verified in a temporary file, not yet in place.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) temp: TempPath,
    pub(crate) size: u64,
    pub(crate) digest: ContentDigest,
}

/// What the caller knows about the content being stored; each known fact is verified.
///
/// # Example
///
/// ```
/// use dunite_core::{ContentDigest, DigestAlgorithm, Expected};
///
/// let expected = Expected::new().with_size(3).with_digest(ContentDigest::of(DigestAlgorithm::Sha256, b"abc"));
/// assert_eq!(expected.size(), Some(3));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    size: Option<u64>,
    digest: Option<ContentDigest>,
}

impl Expected {
    /// Nothing known: the content is hashed with SHA-256 and stored as it comes.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The content must be exactly `bytes` long.
    #[must_use]
    pub fn with_size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }

    /// The content must hash to `digest` (its algorithm is the one computed).
    #[must_use]
    pub fn with_digest(mut self, digest: ContentDigest) -> Self {
        self.digest = Some(digest);
        self
    }

    /// The expected size, if known.
    #[must_use]
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The expected digest, if known.
    #[must_use]
    pub fn digest(&self) -> Option<&ContentDigest> {
        self.digest.as_ref()
    }
}

/// Run blocking file-system work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(std::io::Error::other)?
}

/// Refuse up front an entry whose declared size is over the cap.
fn check_declared_size(expected: &Expected, max_bytes: u64) -> Result<()> {
    match expected.size {
        Some(size) if size > max_bytes => Err(Error::TooLarge { size, max_bytes }),
        _ => Ok(()),
    }
}

/// Read `reader` to its end through a bounded buffer, hashing it and, with a sink, writing it
/// there; check the bytes against `expected` and `max_bytes` as they come.
async fn verify_stream<R: AsyncRead + Unpin>(
    mut reader: R,
    mut sink: Option<(&mut tokio::fs::File, &Path)>,
    expected: &Expected,
    max_bytes: u64,
) -> Result<(u64, ContentDigest)> {
    let algorithm = expected.digest.as_ref().map_or(DigestAlgorithm::Sha256, ContentDigest::algorithm);
    let mut hasher = algorithm.hasher();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| Error::Source { received: size, source: std::sync::Arc::new(e) })?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > max_bytes {
            return Err(Error::TooLarge { size, max_bytes });
        }
        if let Some(expected) = expected.size
            && size > expected
        {
            return Err(Error::TooLong { expected });
        }
        hasher.update(&buf[..n]);
        if let Some((file, path)) = sink.as_mut() {
            file.write_all(&buf[..n]).await.map_err(Error::io("write", *path))?;
        }
    }
    if let Some(expected) = expected.size
        && size < expected
    {
        return Err(Error::Truncated { expected, received: size });
    }
    let digest = hasher.finish();
    if let Some(want) = &expected.digest
        && *want != digest
    {
        return Err(Error::DigestMismatch { expected: want.to_string(), actual: digest.to_string() });
    }
    Ok((size, digest))
}
