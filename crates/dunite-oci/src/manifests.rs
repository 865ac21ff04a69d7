//! `ManifestCache`: OCI manifests by digest, with their media type, and their single-flight
//! upstream fills.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use tokio::io::AsyncReadExt as _;

use dunite_core::{
    CacheOptions, CacheStats, EntryCache, EvictionPolicy, Expected, FillError, FillOptions, Fills, Joined,
    OnConflict, Stored,
};

use crate::content::{Found, open_verified};
use crate::{Digest, Error, Result, TagCache, TagKey};

/// The namespace of manifest rows in the metadata database.
pub const MANIFEST_NAMESPACE: &str = "oci-manifests";

/// The largest manifest a fill reads (the distribution spec suggests registries cap manifests
/// at 4 MiB): a body announced or received past it fails the fill as it arrives.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

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
/// then the one the manifest declares, the row that recorded it being out of reach). A miss
/// is fetched through [`fill`](Self::fill): one upstream request per digest, or per tag and
/// set of accepted types, however many clients ask at once.
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
    /// Upstream fills in flight, by what they answer: one per digest or tag variant at a time.
    fills: Fills<FillKey, ManifestHead>,
    /// Where a tag's fill records its answer ([`with_tag_records`](Self::with_tag_records)).
    tags: Option<TagCache>,
}

/// What one upstream answer is for, and so the key of its fill: a digest, or a tag as one set
/// of accepted types asks for it (its [`TagKey::variant`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FillKey {
    Digest(Digest),
    Tag(String),
}

/// The manifest a fill is asked for ([`ManifestCache::fill`]).
#[derive(Debug, Clone, Copy)]
pub enum ManifestRef<'a> {
    /// By digest: the bytes must hash to it.
    Digest(&'a Digest),
    /// By tag, for one set of accepted types: the bytes must hash to the digest the upstream
    /// announces, if it does.
    Tag(&'a TagKey),
}

/// What a manifest fill learns from the upstream's answer before its bytes, shared by every
/// client of the fill: the media type to serve the manifest as, and the digest its bytes are
/// verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestHead {
    media_type: String,
    digest: Option<Digest>,
}

impl ManifestHead {
    /// An upstream answer served as `media_type` (its `Content-Type`) that announced the
    /// digest `announced` (its `Docker-Content-Digest`), if it did.
    #[must_use]
    pub fn new(media_type: impl Into<String>, announced: Option<Digest>) -> Self {
        Self { media_type: media_type.into(), digest: announced }
    }

    /// The media type to serve the manifest as.
    #[must_use]
    pub fn media_type(&self) -> &str {
        &self.media_type
    }

    /// The digest the bytes are verified against: the one asked for (a manifest by digest,
    /// whatever the upstream announced), else the one the upstream announced; `None` for a
    /// tag whose answer announced none (its bytes are addressed by their SHA-256).
    #[must_use]
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }
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
        let fills =
            Fills::new(cache.entries().clone(), FillOptions::new().with_max_bytes(MAX_MANIFEST_BYTES));
        Ok(Self { cache, fills, tags: None })
    }

    /// The same cache with its tag fills recording their answer in `tags`, inside the fill,
    /// once the bytes are verified and before its clients are told the fill has landed: every
    /// client of the tag that comes after finds the record (none starts another upstream
    /// fetch), whichever client started the fill and whether or not it is still there. A
    /// record that cannot be written is logged; the manifest is served all the same.
    #[must_use]
    pub fn with_tag_records(mut self, tags: TagCache) -> Self {
        self.tags = Some(tags);
        self
    }

    /// The same cache with its fills bound by `options` (say, an idle timeout); call before
    /// the first [`fill`](Self::fill). Fills read at most [`MAX_MANIFEST_BYTES`] unless
    /// `options` bound them otherwise ([`FillOptions::with_max_bytes`]).
    #[must_use]
    pub fn with_fill_options(mut self, options: FillOptions) -> Self {
        let options =
            if options.max_bytes().is_none() { options.with_max_bytes(MAX_MANIFEST_BYTES) } else { options };
        self.fills = Fills::new(self.cache.entries().clone(), options);
        self
    }

    /// Join the upstream fill of the manifest `reference` names, or start it with `fetch` if
    /// none is in flight: the miss path of a pull-through mirror, one upstream request per
    /// digest, or per tag and set of accepted types, however many clients ask at once.
    ///
    /// `fetch` asks the upstream and returns what its answer says ([`ManifestHead`]: the
    /// `Content-Type` and the announced `Docker-Content-Digest`), the body's announced length
    /// and its bytes, or [`FillError::Refused`] with the upstream's status. The bytes are
    /// verified as they arrive: at most [`MAX_MANIFEST_BYTES`] (else
    /// [`TooLarge`](dunite_core::Error::TooLarge)), and hashing to the digest asked for, or
    /// for a tag to the announced digest if any (SHA-512 if so announced, else SHA-256; else
    /// [`DigestMismatch`](dunite_core::Error::DigestMismatch)). Verified, they are stored
    /// under their digest with the media type (a database that cannot record them does not
    /// fail the fill: the manifest is served uncached). Read the outcome with
    /// [`read_fill`](Self::read_fill); look the digest up with [`open`](Self::open) first.
    ///
    /// Requires a Tokio runtime; the fill runs on a task of its own, so a client going away
    /// does not cancel it for the others. See [`dunite_core::Fills`].
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use dunite_core::EvictionPolicy;
    /// use dunite_oci::{AcceptedTypes, ManifestCache, ManifestHead, ManifestRef, TagKey};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let manifests = ManifestCache::new(ManifestCache::options(dir.path(), EvictionPolicy::new(1 << 20))).await?;
    /// let bytes = br#"{"schemaVersion":2,"layers":[]}"#;
    /// let media_type = "application/vnd.oci.image.manifest.v1+json";
    /// let key = TagKey::new("registry.example", "library/alpine", "3", AcceptedTypes::new());
    /// let joined = manifests.fill(ManifestRef::Tag(&key), move || async move {
    ///     // An HTTP client's response would go here; this upstream announces no digest.
    ///     let body = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(bytes))]);
    ///     Ok((ManifestHead::new(media_type, None), Some(bytes.len() as u64), body))
    /// })?;
    /// let (manifest, digest) = manifests.read_fill(joined).await?;
    /// assert_eq!((manifest.bytes(), manifest.media_type()), (&bytes[..], media_type));
    /// // Stored under the digest of its bytes.
    /// assert_eq!(manifests.open(&digest).await?, Some(manifest));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] outside a Tokio runtime. The fill's own failures reach its clients
    /// through [`Joined`].
    pub fn fill<F, Fut, S, E>(&self, reference: ManifestRef<'_>, fetch: F) -> Result<Joined<ManifestHead>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<(ManifestHead, Option<u64>, S), FillError>> + Send,
        S: Stream<Item = std::result::Result<Bytes, E>> + Send,
        E: std::error::Error + Send + Sync + 'static,
    {
        let (key, asked) = match reference {
            ManifestRef::Digest(digest) => (FillKey::Digest(digest.clone()), Some(digest.clone())),
            ManifestRef::Tag(tag) => (FillKey::Tag(tag.variant().to_owned()), None),
        };
        // A tag's fill records its answer itself (see `with_tag_records`).
        let record = match reference {
            ManifestRef::Tag(tag) => self.tags.clone().map(|tags| (tags, tag.clone())),
            ManifestRef::Digest(_) => None,
        };
        let expected = asked.as_ref().map_or_else(Expected::new, |digest| {
            Expected::new().with_digest(digest.content_digest().clone())
        });
        Ok(self.fills.join(key, expected, move |mut filling| async move {
            let (mut head, total, body) = fetch().await?;
            match asked {
                // The bytes are verified against the digest asked for (the join's), whatever
                // the upstream announced.
                Some(asked) => head.digest = Some(asked),
                None => {
                    if let Some(announced) = &head.digest {
                        filling.expect_digest(announced.content_digest().clone())?;
                    }
                }
            }
            let media_type = head.media_type.clone();
            filling.respond(head, total).await?;
            filling.receive(body).await?;
            // A tag's manifest is stored under the digest of its bytes, known only now.
            let digest = Digest::from(filling.digest().expect("receive verified the bytes").clone());
            if let Some((tags, tag)) = record
                && let Err(error) = tags.record(&tag, &digest, &media_type).await
            {
                tracing::warn!(%error, tag = tag.last(), "could not record a tag's answer; served all the same");
            }
            filling.commit(&digest.to_string(), move |_| media_type).await
        })?)
    }

    /// Wait for a manifest fill ([`fill`](Self::fill)) to end and read its manifest whole
    /// (fills are bounded: at most [`MAX_MANIFEST_BYTES`] by default), with the digest it is
    /// stored under.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the fill goes on for its other clients.
    ///
    /// # Errors
    ///
    /// The fill's [`FillError`]; [`FillError::Local`] if its verified bytes cannot be read.
    pub async fn read_fill(
        &self,
        mut joined: Joined<ManifestHead>,
    ) -> std::result::Result<(Manifest, Digest), FillError> {
        let size = joined.finished().await?.size();
        let started = joined.started().await?;
        let head = started.head();
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut body = std::pin::pin!(joined.body(0, Some(size)));
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| {
                FillError::Local(Arc::new(dunite_core::Error::Io {
                    op: "read a manifest fill's spool in the cache's",
                    path: "tmp/".into(),
                    source: Arc::new(source),
                }))
            })?;
            bytes.extend_from_slice(&chunk);
        }
        // Verified by the fill: the digest asked for or announced, else their SHA-256.
        let digest = head.digest().cloned().unwrap_or_else(|| Digest::sha256_of(&bytes));
        Ok((Manifest::new(bytes, head.media_type().to_owned()), digest))
    }

    /// Manifest fills in flight now.
    #[must_use]
    pub fn fills_in_flight(&self) -> usize {
        self.fills.in_flight()
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
