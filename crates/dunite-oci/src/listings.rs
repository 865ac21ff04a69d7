//! Listings: a repository's tag list (`tags/list`) and a manifest's referrers
//! (`referrers/<digest>`), as the upstream last answered them, kept in the [`TagCache`] beside
//! the tag records: like them, they are what a name means upstream now, fresh for the tag TTL
//! and a stale fallback for when the upstream does not answer.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use dunite_core::Expected;

use crate::tags::age_of;
use crate::{Result, TagCache};

/// The largest listing read from an upstream (a tag list without `n`, or an index of
/// referrers): a registry that sends more is asked to paginate (`n`), not read whole.
pub const MAX_LISTING_BYTES: usize = 4 << 20;

/// The largest share of the tag cache's cap one listing may take: a listing larger than the
/// cap divided by this is served but not kept, so one long tag list never evicts more than
/// this share of the tag records.
const CAP_SHARE: u64 = 8;

/// Where a listing is kept: `<host>/<name>/<path>?<query>`, with `path` `tags/list` or
/// `referrers/<digest>` and `query` the parameters passed to the upstream, encoded. Tag
/// records' keys (`<host>/<name>:<tag>`) never hold a `?`, so the two never meet.
///
/// ```
/// use dunite_oci::ListingKey;
///
/// let key = ListingKey::new("registry.example", "library/alpine", "tags/list", "n=10&last=3.19");
/// assert_eq!(key.as_str(), "registry.example/library/alpine/tags/list?n=10&last=3.19");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListingKey(String);

impl ListingKey {
    /// The key of the listing at `path` (`tags/list`, `referrers/<digest>`) in repository
    /// `name` of registry `host`, asked with the encoded `query`.
    #[must_use]
    pub fn new(host: &str, name: &str, path: &str, query: &str) -> Self {
        Self(format!("{host}/{name}/{path}?{query}"))
    }

    /// The key as stored.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An upstream's answer to a listing: the JSON body and the headers a client needs from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    body: Vec<u8>,
    head: Head,
    age: Duration,
    fresh: bool,
}

/// What is kept besides the body (the entry's meta).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    content_type: String,
    /// The next page's query (`n=..&last=..`), from the upstream's `Link: <..>; rel="next"`.
    next: Option<String>,
    /// The upstream's `OCI-Filters-Applied` (a referrers list filtered by `artifactType`).
    filters_applied: Option<String>,
}

impl Listing {
    /// An answer just received: `body`, served as `content_type`.
    #[must_use]
    pub fn new(body: Vec<u8>, content_type: impl Into<String>) -> Self {
        let head = Head { content_type: content_type.into(), next: None, filters_applied: None };
        Self { body, head, age: Duration::ZERO, fresh: true }
    }

    /// The same answer with the query of its next page (from its `Link` header).
    #[must_use]
    pub fn with_next(mut self, query: Option<String>) -> Self {
        self.head.next = query;
        self
    }

    /// The same answer with the filters the upstream says it applied (`OCI-Filters-Applied`).
    #[must_use]
    pub fn with_filters_applied(mut self, filters: Option<String>) -> Self {
        self.head.filters_applied = filters;
        self
    }

    /// The body.
    #[must_use]
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body's media type.
    #[must_use]
    pub fn content_type(&self) -> &str {
        &self.head.content_type
    }

    /// The next page's query, if the upstream announced one.
    #[must_use]
    pub fn next(&self) -> Option<&str> {
        self.head.next.as_deref()
    }

    /// The filters the upstream applied, if it said.
    #[must_use]
    pub fn filters_applied(&self) -> Option<&str> {
        self.head.filters_applied.as_deref()
    }

    /// How long ago the upstream answered it (zero for one just received).
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

impl TagCache {
    /// The listing kept under `key`, fresh or not; `None` if there is none, or if the
    /// database is unavailable (the listing is then asked upstream). Records the access.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads (the access is recorded in memory).
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) on a failure other than the database's.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    ///
    /// use dunite_core::EvictionPolicy;
    /// use dunite_oci::{Listing, ListingKey, TagCache};
    ///
    /// let dir = tempfile::tempdir()?;
    /// // Needs a Tokio runtime: the cache spawns its evictor.
    /// let tags = TagCache::new(TagCache::options(dir.path(), EvictionPolicy::new(1 << 20)), Duration::from_secs(300)).await?;
    /// let key = ListingKey::new("registry.example", "app", "tags/list", "n=2");
    /// let answer = Listing::new(br#"{"name":"app","tags":["a","b"]}"#.to_vec(), "application/json")
    ///     .with_next(Some("n=2&last=b".to_owned()));
    /// tags.record_listing(&key, &answer).await?;
    /// let kept = tags.listing(&key).await?.expect("kept");
    /// assert_eq!((kept.body(), kept.next()), (answer.body(), Some("n=2&last=b")));
    /// assert!(kept.is_fresh());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn listing(&self, key: &ListingKey) -> Result<Option<Listing>> {
        let mut entry = match self.entries().open_entry(key.as_str()).await {
            Ok(Some(entry)) => entry,
            Ok(None) => return Ok(None),
            Err(error) if error.is_database() => {
                tracing::warn!(%error, listing = key.as_str(), "database unavailable; asking the upstream");
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        let Ok(head) = serde_json::from_str::<Head>(&entry.info.meta) else { return Ok(None) };
        let mut body = Vec::with_capacity(usize::try_from(entry.info.size).unwrap_or(0));
        entry.file.read_to_end(&mut body).await.map_err(|source| dunite_core::Error::Io {
            op: "read a listing",
            path: key.as_str().into(),
            source: std::sync::Arc::new(source),
        })?;
        let age = age_of(entry.info.stored_at_ms);
        Ok(Some(Listing { body, head, age, fresh: age < self.ttl() }))
    }

    /// Keep `listing` under `key`, replacing what was there. A listing over an eighth of the
    /// cache's cap is not kept (logged), nor is one the database cannot record (logged): the
    /// caller serves it all the same.
    ///
    /// # Cancel safety
    ///
    /// Cancelling never leaves a partial listing visible.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`](crate::Error::Cache) on an I/O failure.
    pub async fn record_listing(&self, key: &ListingKey, listing: &Listing) -> Result<()> {
        let size = listing.body.len() as u64;
        if size > self.max_bytes() / CAP_SHARE {
            tracing::info!(listing = key.as_str(), size, "listing too large to keep; served uncached");
            return Ok(());
        }
        let meta = serde_json::to_string(&listing.head).unwrap_or_default();
        let expected = Expected::new().with_size(size);
        match self.entries().store(key.as_str(), listing.body(), &expected, &meta).await {
            Ok(_) => Ok(()),
            Err(error) if error.is_database() => {
                tracing::warn!(%error, listing = key.as_str(), "database unavailable; listing not kept");
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use dunite_core::EvictionPolicy;

    use super::*;

    async fn cache(dir: &std::path::Path, cap: u64, ttl: Duration) -> TagCache {
        TagCache::new(TagCache::options(dir, EvictionPolicy::new(cap)), ttl).await.unwrap()
    }

    #[tokio::test]
    async fn a_listing_comes_back_as_kept_and_goes_stale_after_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let tags = cache(dir.path(), 1 << 20, Duration::ZERO).await;
        let key = ListingKey::new("r.example", "a/b", "referrers/sha256:00", "artifactType=x%2Fy");
        assert_eq!(tags.listing(&key).await.unwrap(), None);
        let answer = Listing::new(b"{}".to_vec(), "application/vnd.oci.image.index.v1+json")
            .with_filters_applied(Some("artifactType".into()));
        tags.record_listing(&key, &answer).await.unwrap();
        let kept = tags.listing(&key).await.unwrap().unwrap();
        assert_eq!((kept.body(), kept.content_type()), (&b"{}"[..], answer.content_type()));
        assert_eq!((kept.filters_applied(), kept.next()), (Some("artifactType"), None));
        assert!(!kept.is_fresh(), "a zero TTL makes everything stale");
        // Replaced by the next answer.
        tags.record_listing(&key, &Listing::new(b"{\"manifests\":[]}".to_vec(), "x/y")).await.unwrap();
        assert_eq!(tags.listing(&key).await.unwrap().unwrap().content_type(), "x/y");
    }

    #[tokio::test]
    async fn a_listing_over_its_share_of_the_cap_is_served_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let tags = cache(dir.path(), 8 << 10, Duration::from_secs(60)).await;
        let key = ListingKey::new("r.example", "a", "tags/list", "");
        tags.record_listing(&key, &Listing::new(vec![b' '; (1 << 10) + 1], "application/json"))
            .await
            .unwrap();
        assert_eq!(tags.listing(&key).await.unwrap(), None);
        assert_eq!(tags.entries().total_bytes().await.unwrap(), 0);
        tags.record_listing(&key, &Listing::new(vec![b' '; 1 << 10], "application/json")).await.unwrap();
        assert!(tags.listing(&key).await.unwrap().is_some());
    }
}
