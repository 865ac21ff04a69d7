//! Content-addressed reads that survive a metadata database outage.
//!
//! Blobs and manifests are keyed by their digest, so a payload found on disk can be trusted
//! without its row once its bytes hash to the key. [`open_verified`] is that one rule, shared
//! by [`BlobCache::open`](crate::BlobCache::open) and
//! [`ManifestCache::open`](crate::ManifestCache::open).

use dunite_core::{EntryCache, EntryInfo};

use crate::{Digest, Result};

/// What [`open_verified`] found.
pub(crate) enum Found {
    /// The row and its payload: the normal path.
    Indexed {
        /// The payload, positioned at its start.
        file: tokio::fs::File,
        /// The row.
        info: EntryInfo,
    },
    /// A payload found on disk without the database, verified against the digest.
    OnDisk {
        /// The payload, positioned at its start.
        file: tokio::fs::File,
        /// Its size.
        size: u64,
    },
}

/// Open `digest`'s payload in `cache`, recording the access.
///
/// When the metadata database is unreachable, the payload is looked for on disk instead and
/// handed out only if its bytes hash to `digest` (a full read of the file first). A pool
/// merely busy is no outage: its timeout is returned
/// ([`is_pool_timeout`](dunite_core::Error::is_pool_timeout)), not turned into a full-file
/// read per request. `what` names the content in the outage's log line.
pub(crate) async fn open_verified(
    cache: &EntryCache,
    digest: &Digest,
    what: &'static str,
) -> Result<Option<Found>> {
    let key = digest.to_string();
    match cache.open_entry(&key).await {
        Ok(entry) => Ok(entry.map(|entry| Found::Indexed { file: entry.file, info: entry.info })),
        Err(error) if error.is_database_unavailable() => {
            tracing::warn!(%error, %digest, what, "metadata database unavailable; looking on disk");
            let found = cache.open_unindexed(&key, digest.content_digest()).await?;
            Ok(found.map(|(file, size)| Found::OnDisk { file, size }))
        }
        Err(error) => Err(error.into()),
    }
}
