//! `ManifestCache`: OCI manifests by digest, with their media type.

use tokio::io::AsyncReadExt as _;

use dunite_core::{CacheOptions, CacheStats, EntryCache, EvictionPolicy, Expected, OnConflict, Stored};

use crate::content::{Found, open_verified};
use crate::{Digest, Error, Result};

/// The namespace of manifest rows in the metadata database.
pub const MANIFEST_NAMESPACE: &str = "oci-manifests";

/// The OCI image index type, for a document with `manifests` that declares no type.
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The OCI image manifest type, for everything else that declares none.
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A byte-capped cache of OCI manifests keyed by [`Digest`], each stored with the media type
/// its registry served it as. Cheap to clone; clones share the cache, and its eviction task
/// ends when the last clone drops.
///
/// Manifests are content-addressed like blobs: a store is verified against the digest (and a
/// second store of a digest keeps the first), and a read survives a metadata database outage
/// (the manifest is found on disk and verified before it is handed out; its media type is
/// then the one the manifest declares, the row that recorded it being out of reach).
///
/// # Example
///
/// ```
/// use dunite_core::EvictionPolicy;
/// use dunite_oci::{Digest, ManifestCache};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// // Needs a Tokio runtime: the cache spawns its evictor.
/// let manifests = ManifestCache::new(ManifestCache::options(dir.path(), EvictionPolicy::new(64 << 20))).await?;
///
/// let bytes = br#"{"schemaVersion":2,"layers":[]}"#;
/// let digest = Digest::sha256_of(bytes);
/// let media_type = "application/vnd.oci.image.manifest.v1+json";
/// manifests.store(&digest, bytes, media_type).await?;
///
/// let manifest = manifests.open(&digest).await?.expect("cached");
/// assert_eq!((manifest.bytes(), manifest.media_type()), (&bytes[..], media_type));
///
/// // Bytes that do not hash to the digest are refused and nothing is stored.
/// let other = Digest::sha256_of(b"something else");
/// assert!(manifests.store(&other, bytes, media_type).await.is_err());
/// assert!(manifests.open(&other).await?.is_none());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ManifestCache {
    cache: EntryCache,
}

/// A cached manifest, read whole (registries cap manifests at a few MiB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    bytes: Vec<u8>,
    media_type: String,
}

impl Manifest {
    /// A manifest of `bytes`, served as `media_type` (say, one just fetched and stored).
    #[must_use]
    pub fn new(bytes: Vec<u8>, media_type: String) -> Self {
        Self { bytes, media_type }
    }

    /// The manifest's bytes, which hash to its digest.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The media type to serve it as.
    #[must_use]
    pub fn media_type(&self) -> &str {
        &self.media_type
    }

    /// The bytes and the media type.
    #[must_use]
    pub fn into_parts(self) -> (Vec<u8>, String) {
        (self.bytes, self.media_type)
    }
}

impl ManifestCache {
    /// The options of a manifest cache with payloads under `dir` and its metadata in the
    /// embedded SQLite database `dir/metadata.db`; adjust them before [`new`](Self::new)
    /// (`.with_database(..)` shares one database between caches).
    #[must_use]
    pub fn options(dir: impl Into<std::path::PathBuf>, policy: EvictionPolicy) -> CacheOptions {
        CacheOptions::new(dir, MANIFEST_NAMESPACE, policy)
    }

    /// Open or create the cache (see [`BlobCache::new`](crate::BlobCache::new)).
    ///
    /// Requires a Tokio runtime. Stores are content-addressed whatever `options` say.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the directory or database cannot be opened or the options are
    /// inconsistent.
    pub async fn new(options: CacheOptions) -> Result<Self> {
        let cache = EntryCache::open(options.with_on_conflict(OnConflict::KeepExisting)).await?;
        Ok(Self { cache })
    }

    /// Store `bytes` as the manifest with `digest`, served as `media_type`. The bytes are
    /// verified against the digest before anything is committed; a digest already cached
    /// keeps its first store.
    ///
    /// # Cancel safety
    ///
    /// Cancelling never leaves a visible partial manifest or counted bytes.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] with [`DigestMismatch`](dunite_core::Error::DigestMismatch) when the
    /// bytes do not hash to `digest`, [`TooLarge`](dunite_core::Error::TooLarge) over the
    /// cap, or an I/O or database error ([`Error::is_database`]: the bytes were verified but
    /// not recorded). Nothing is stored in any of these cases.
    pub async fn store(&self, digest: &Digest, bytes: &[u8], media_type: &str) -> Result<Stored> {
        let expected =
            Expected::new().with_size(bytes.len() as u64).with_digest(digest.content_digest().clone());
        Ok(self.cache.store(&digest.to_string(), bytes, &expected, media_type).await?)
    }

    /// The manifest with `digest`, if cached, read whole; the hit is recorded for LRU order.
    ///
    /// When the metadata database is unreachable, the manifest is looked for on disk and
    /// handed out only if it hashes to `digest`, with the media type it declares (see
    /// [`declared_media_type`]). A busy pool is no outage: its timeout is returned
    /// ([`Error::is_pool_timeout`]).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a read records at most its access.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the metadata cannot be read and the directory cannot be searched
    /// either, [`Error::Read`] if the payload cannot be read.
    pub async fn open(&self, digest: &Digest) -> Result<Option<Manifest>> {
        let Some(found) = open_verified(&self.cache, digest, "manifest").await? else { return Ok(None) };
        let (mut file, media_type) = match found {
            Found::Indexed { file, info } => (file, Some(info.meta)),
            Found::OnDisk { file, .. } => (file, None),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).await.map_err(|source| Error::Read {
            what: "manifest",
            digest: digest.clone(),
            source: source.into(),
        })?;
        let media_type = media_type.unwrap_or_else(|| declared_media_type(&bytes));
        Ok(Some(Manifest { bytes, media_type }))
    }

    /// Hits, misses, bytes stored and the evictor's counters.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The shared entry cache underneath.
    #[must_use]
    pub fn entries(&self) -> &EntryCache {
        &self.cache
    }
}

/// The `mediaType` a manifest declares; without one (or with an empty one, or one that cannot
/// be a header value), the OCI index type for a document with `manifests`, else the OCI image
/// manifest type. What a manifest read without its row is served as.
///
/// ```
/// use dunite_oci::declared_media_type;
///
/// assert_eq!(declared_media_type(br#"{"manifests":[]}"#), "application/vnd.oci.image.index.v1+json");
/// assert_eq!(declared_media_type(b"not json"), "application/vnd.oci.image.manifest.v1+json");
/// ```
#[must_use]
pub fn declared_media_type(manifest: &[u8]) -> String {
    // Read as a map, so a repeated key takes its last value, as Go's decoder (the registries'
    // and most clients') does.
    let Ok(serde_json::Value::Object(document)) = serde_json::from_slice(manifest) else {
        return MANIFEST.to_owned();
    };
    match document.get("mediaType").and_then(serde_json::Value::as_str) {
        Some(declared) if is_header_text(declared) => declared.to_owned(),
        _ if document.get("manifests").is_some_and(|m| !m.is_null()) => INDEX.to_owned(),
        _ => MANIFEST.to_owned(),
    }
}

/// Whether `text` can be sent as a non-empty HTTP header value: tabs and bytes from 0x20 on,
/// but DEL (the rule of the `http` crate's `HeaderValue`).
#[must_use]
pub fn is_header_text(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_without_a_media_type_is_served_as_an_index() {
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(declared_media_type(index), INDEX);
        let manifest = br#"{"schemaVersion":2,"layers":[]}"#;
        assert_eq!(declared_media_type(manifest), MANIFEST);
        assert_eq!(declared_media_type(br#"{"mediaType":"a\nb","manifests":[]}"#), INDEX);
    }
}
