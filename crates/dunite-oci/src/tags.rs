//! `TagCache`: tag -> digest records, one per set of accepted manifest types, with a TTL and
//! a stale fallback (and, in `listings.rs`, the tag lists and referrers kept the same way).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use dunite_core::{
    CacheOptions, CacheStats, ContentDigest, DigestAlgorithm, EntryCache, EvictionPolicy, Expected,
    OnConflict,
};

use crate::{Digest, Result};

/// The namespace of tag rows in the metadata database.
pub const TAG_NAMESPACE: &str = "oci-tags";

/// Manifest media types as clients name them in `Accept`. The tag cache keys on these alone:
/// registries ignore other types, and keying on them would let a client mint variants.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json",
    "*/*",
];

/// The types of manifests that list other manifests (one per platform).
const LIST_TYPES: &[&str] =
    &["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];

/// The manifest media types a client accepts, as the tag cache keys them.
///
/// A registry answers a tag by what the client accepts (an index, one platform's manifest, or
/// a 404 to a client that takes no index), so the cache keeps one answer per set of accepted
/// manifest types, as an HTTP cache honours `Vary: Accept`. Order, parameters, case,
/// repetitions and types that are not manifest types ([`MANIFEST_TYPES`]) do not change the
/// set; a refused type (`q=0`) leaves it whatever else accepts it. Reading an `Accept`
/// header into these is the server's business.
///
/// ```
/// use dunite_oci::AcceptedTypes;
///
/// let mut types = AcceptedTypes::new();
/// types.accept("Application/VND.oci.image.manifest.v1+json; q=0.9");
/// types.accept("text/html");
/// types.refuse("application/vnd.oci.image.index.v1+json");
/// types.accept("application/vnd.oci.image.index.v1+json");
/// assert_eq!(types.accepted().collect::<Vec<_>>(), ["application/vnd.oci.image.manifest.v1+json"]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcceptedTypes {
    accepted: BTreeSet<String>,
    refused: BTreeSet<String>,
}

impl AcceptedTypes {
    /// No type accepted.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Accept `media_type` (parameters and case ignored), if it is a manifest type.
    pub fn accept(&mut self, media_type: &str) {
        let media_type = bare_type(media_type);
        if MANIFEST_TYPES.contains(&media_type.as_str()) {
            self.accepted.insert(media_type);
        }
    }

    /// Refuse `media_type` (parameters and case ignored), whatever accepts it.
    pub fn refuse(&mut self, media_type: &str) {
        self.refused.insert(bare_type(media_type));
    }

    /// The accepted manifest types (and `*/*`), sorted, distinct, none refused: what to ask
    /// the upstream for, so that its answer suits every client sharing the record.
    pub fn accepted(&self) -> impl Iterator<Item = &str> {
        self.accepted.iter().filter(|t| !self.refused.contains(*t)).map(String::as_str)
    }

    /// Whether the tag's last answer, of `media_type`, may be served to this client: it accepts
    /// the type (and did not refuse it), and a single manifest (one platform's) is not served
    /// to a client that asked for an index or list, which would get the wrong platform.
    #[must_use]
    pub fn may_serve(&self, media_type: &str) -> bool {
        let media_type = bare_type(media_type);
        let accepted =
            !self.refused.contains(&media_type) && self.accepted().any(|t| t == media_type || t == "*/*");
        let is_list = LIST_TYPES.contains(&media_type.as_str());
        let wants_list = self.accepted().any(|t| LIST_TYPES.contains(&t));
        accepted && (is_list || !wants_list)
    }

    /// 16 hex digits of the sha256 of the accepted types, comma-joined.
    fn fingerprint(&self) -> String {
        let joined = self.accepted().collect::<Vec<_>>().join(",");
        let mut hex = ContentDigest::of(DigestAlgorithm::Sha256, joined.as_bytes()).hex();
        hex.truncate(16);
        hex
    }
}

/// A media type as compared here: without parameters, lower case.
fn bare_type(media_type: &str) -> String {
    media_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Where a tag's records live: `<host>/<name>:<tag>@<fingerprint of the accepted types>` for
/// this set of types (the variant), and `<host>/<name>:<tag>` for the tag's latest answer to
/// anyone (the last), served stale to clients it suits while the upstream is down.
///
/// ```
/// use dunite_oci::{AcceptedTypes, TagKey};
///
/// let mut types = AcceptedTypes::new();
/// types.accept("application/vnd.oci.image.index.v1+json");
/// let key = TagKey::new("registry.example", "library/alpine", "3", types);
/// assert_eq!(key.last(), "registry.example/library/alpine:3");
/// assert!(key.variant().starts_with("registry.example/library/alpine:3@"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagKey {
    variant: String,
    last: String,
    types: AcceptedTypes,
}

impl TagKey {
    /// The key of `tag` in repository `name` of registry `host`, for a client accepting `types`.
    #[must_use]
    pub fn new(host: &str, name: &str, tag: &str, types: AcceptedTypes) -> Self {
        let last = format!("{host}/{name}:{tag}");
        Self { variant: format!("{last}@{}", types.fingerprint()), last, types }
    }

    /// The record of this set of accepted types.
    #[must_use]
    pub fn variant(&self) -> &str {
        &self.variant
    }

    /// The record of the tag's latest answer to anyone.
    #[must_use]
    pub fn last(&self) -> &str {
        &self.last
    }

    /// The accepted types the key was made for.
    #[must_use]
    pub fn types(&self) -> &AcceptedTypes {
        &self.types
    }
}

/// What a tag resolved to, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    digest: Digest,
    media_type: String,
    age: Duration,
    fresh: bool,
}

impl TagRecord {
    /// The manifest's digest.
    #[must_use]
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The manifest's media type, as the upstream served it.
    #[must_use]
    pub fn media_type(&self) -> &str {
        &self.media_type
    }

    /// How long ago the upstream answered it (zero for a clock that went back).
    #[must_use]
    pub fn age(&self) -> Duration {
        self.age
    }

    /// Whether it is younger than the cache's TTL: served without asking the upstream.
    #[must_use]
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }
}

/// A record as stored: the payload and the meta alike.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    digest: String,
    media_type: String,
}

/// A byte-capped cache of tag -> manifest digest records, keyed by [`TagKey`], fresh for a
/// TTL; and of [listings](crate::Listing) (tag lists, referrers), keyed by
/// [`ListingKey`](crate::ListingKey), under the same cap and TTL: everything the upstream may
/// answer differently tomorrow for the same name. Cheap to clone; clones share the cache.
///
/// A record is a hint, never the content: the manifest it names lives in a
/// [`ManifestCache`](crate::ManifestCache). So when the metadata database fails, a lookup
/// answers `None` (the tag is then resolved upstream) and a record that cannot be written is
/// skipped (the answer is still served); both are logged. A record counts against the cap by
/// its size (its JSON is also its payload), so records are evicted like any entry.
///
/// # Example
///
/// ```
/// use std::time::Duration;
///
/// use dunite_core::EvictionPolicy;
/// use dunite_oci::{AcceptedTypes, Digest, TagCache, TagKey};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// // Needs a Tokio runtime: the cache spawns its evictor.
/// let options = TagCache::options(dir.path(), EvictionPolicy::new(1 << 20));
/// let tags = TagCache::new(options, Duration::from_secs(300)).await?;
///
/// let mut types = AcceptedTypes::new();
/// types.accept("application/vnd.oci.image.index.v1+json");
/// let key = TagKey::new("registry.example", "library/alpine", "3", types);
/// assert!(tags.get(&key).await?.is_none());
///
/// let digest = Digest::sha256_of(b"an index");
/// tags.record(&key, &digest, "application/vnd.oci.image.index.v1+json").await?;
/// let record = tags.get(&key).await?.expect("recorded");
/// assert_eq!(record.digest(), &digest);
/// assert!(record.is_fresh());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TagCache {
    cache: EntryCache,
    ttl: Duration,
    /// The cap, for the share a listing may take.
    max_bytes: u64,
}

impl TagCache {
    /// The options of a tag cache with payloads under `dir` and its metadata in the embedded
    /// SQLite database `dir/metadata.db`; adjust them before [`new`](Self::new).
    #[must_use]
    pub fn options(dir: impl Into<std::path::PathBuf>, policy: EvictionPolicy) -> CacheOptions {
        CacheOptions::new(dir, TAG_NAMESPACE, policy)
    }

    /// Open or create the cache, whose records are fresh for `ttl`. A new record of a key
    /// replaces the old one, whatever `options` say.
    ///
    /// Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) if the directory or database cannot be opened or
    /// the options are inconsistent.
    pub async fn new(options: CacheOptions, ttl: Duration) -> Result<Self> {
        let max_bytes = options.policy().max_bytes();
        let cache = EntryCache::open(options.with_on_conflict(OnConflict::Replace)).await?;
        Ok(Self { cache, ttl, max_bytes })
    }

    /// The record of `key`'s set of accepted types, fresh or not; `None` if there is none
    /// (or the database is unavailable: then the tag is resolved upstream).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) on a failure other than the database's.
    pub async fn get(&self, key: &TagKey) -> Result<Option<TagRecord>> {
        self.read(key.variant()).await
    }

    /// Record that `key`'s tag resolved to `digest`, of `media_type`: as the record of its
    /// accepted types, and as the tag's latest answer. A database failure skips the records
    /// (logged); the caller serves its answer anyway.
    ///
    /// # Cancel safety
    ///
    /// Cancelling may leave the first record written and not the second; each is whole.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) on an I/O failure, or a record over the cap.
    pub async fn record(&self, key: &TagKey, digest: &Digest, media_type: &str) -> Result<()> {
        let stored = Stored { digest: digest.to_string(), media_type: media_type.to_owned() };
        let meta = serde_json::to_string(&stored).unwrap_or_default();
        // The record is also the payload, so each counts against the cap by its size (an
        // empty payload would never be evicted); reads use the meta.
        let expected = Expected::new().with_size(meta.len() as u64);
        for record in [key.variant(), key.last()] {
            match self.cache.store(record, meta.as_bytes(), &expected, &meta).await {
                Ok(_) => {}
                Err(error) if error.is_database() => {
                    tracing::warn!(%error, tag = record, "database unavailable; tag record skipped");
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// What to serve while the upstream is down: `variant`, the record [`get`](Self::get)
    /// found for `key`, if any; else the tag's latest answer to anyone, if `key`'s types
    /// [may be served](AcceptedTypes::may_serve) it. Fresh or not.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    pub async fn stale(&self, key: &TagKey, variant: Option<TagRecord>) -> Result<Option<TagRecord>> {
        if variant.is_some() {
            return Ok(variant);
        }
        let last = self.read(key.last()).await?;
        Ok(last.filter(|record| key.types().may_serve(record.media_type())))
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

    /// How long a record or listing is fresh.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The byte cap of the records and listings.
    pub(crate) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    async fn read(&self, record: &str) -> Result<Option<TagRecord>> {
        let info = match self.cache.info(record).await {
            Ok(Some(info)) => info,
            Ok(None) => return Ok(None),
            Err(error) if error.is_database() => {
                tracing::warn!(%error, tag = record, "database unavailable; resolving the tag upstream");
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        let Ok(stored) = serde_json::from_str::<Stored>(&info.meta) else { return Ok(None) };
        let Ok(digest) = stored.digest.parse() else { return Ok(None) };
        let age = age_of(info.stored_at_ms);
        Ok(Some(TagRecord { digest, media_type: stored.media_type, age, fresh: age < self.ttl }))
    }
}

/// The time since `stored_at_ms` (milliseconds since the Unix epoch), zero if in the future.
pub(crate) fn age_of(stored_at_ms: i64) -> Duration {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Duration::from_millis(u64::try_from(now_ms.saturating_sub(stored_at_ms)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(items: &[&str]) -> AcceptedTypes {
        let mut types = AcceptedTypes::new();
        for item in items {
            match item.strip_prefix('!') {
                Some(refused) => types.refuse(refused),
                None => types.accept(item),
            }
        }
        types
    }

    #[test]
    fn keys_vary_by_the_accepted_manifest_types_only() {
        let key = |items: &[&str]| TagKey::new("r.example", "a/b", "v1", types(items)).variant;
        let index = "application/vnd.oci.image.index.v1+json";
        let manifest = "application/vnd.oci.image.manifest.v1+json";
        let oci = key(&[index, manifest]);
        assert_eq!(oci, key(&["Application/VND.oci.image.manifest.v1+json;q=0.9", index, "x/y"]));
        assert_ne!(oci, key(&[manifest]));
        assert_eq!(key(&[manifest]), key(&[manifest, index, &format!("!{index}")]));
        assert_ne!(oci, TagKey::new("r.example", "a/b", "v2", types(&[index, manifest])).variant);
        let suffix = oci.strip_prefix("r.example/a/b:v1@").unwrap();
        assert!(suffix.len() == 16 && suffix.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn the_last_answer_is_served_only_to_clients_it_suits() {
        let index = "application/vnd.oci.image.index.v1+json";
        let single = "application/vnd.docker.distribution.manifest.v2+json";
        let oci = types(&[index, "application/vnd.oci.image.manifest.v1+json"]);
        assert!(oci.may_serve(index));
        assert!(!oci.may_serve(single), "not accepted");
        assert!(!types(&["*/*", index]).may_serve(single), "the wrong platform");
        assert!(types(&["*/*"]).may_serve(single));
        assert!(!types(&[&format!("!{index}"), "*/*"]).may_serve(index), "refused");
    }
}
