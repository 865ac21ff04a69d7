//! Digest-addressed, byte-capped OCI caches: blobs, manifests and tags.
//!
//! [`BlobCache`] stores container image blobs under their OCI [`Digest`], verifies every byte
//! against it, and stays under a byte cap through `dunite-core`'s [`DebouncedEvictor`]: a
//! burst of stores (a `docker pull`) collapses into one pending eviction pass holding one
//! database connection, instead of one eviction task and connection per blob.
//!
//! Storage (the metadata, in embedded SQLite or a shared PostgreSQL, the payload directory,
//! the crash-safe store sequence, reconciliation) is `dunite-core`'s [`EntryCache`]; this
//! crate adds what is particular to OCI blobs: digest keys, digest verification, and
//! content-addressed stores (the same digest is the same bytes, so a second store is a
//! no-op), and reads that survive a database outage (a blob found on disk is verified
//! against its digest before it is handed out).
//!
//! A pull-through mirror needs two more caches, on the same machinery:
//! [`ManifestCache`] (manifests by digest with their media type, content-addressed and
//! outage-tolerant like blobs: both read through one fallback; misses are single-flight fills
//! like blobs', by digest or by tag, bounded by [`MAX_MANIFEST_BYTES`]) and [`TagCache`] (tag ->
//! digest records, one per set of [`AcceptedTypes`], fresh for a TTL, and a stale fallback
//! for when the upstream is down; it keeps a repository's tag list and a manifest's referrers,
//! as [`Listing`]s, the same way). This crate knows nothing of HTTP: reading an `Accept`
//! header, asking an upstream and answering clients are the server's.
//!
//! Every cache requires a Tokio runtime (each spawns its evictor). Their async methods are
//! cancel safe: a cancelled store leaves no visible partial entry and no counted bytes; see
//! each method's `# Cancel safety`.
//!
//! [`DebouncedEvictor`]: dunite_core::DebouncedEvictor
//! [`EntryCache`]: dunite_core::EntryCache
//!
//! # Example
//!
//! ```
//! use dunite_oci::{BlobCache, Digest};
//! use dunite_core::EvictionPolicy;
//! use tokio::io::AsyncReadExt as _;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! // 20 GiB cap; evict down to 18 GiB once over it. Needs a Tokio runtime.
//! let policy = EvictionPolicy::new(20 << 30).with_low_watermark(18 << 30);
//! let cache = BlobCache::new(BlobCache::options(dir.path(), policy)).await?;
//!
//! let layer = b"a layer's bytes".to_vec();
//! let digest = Digest::sha256_of(&layer);
//! cache.store_with_size(&digest, layer.len() as u64, &layer[..]).await?;
//!
//! // A wrong digest is refused and stores nothing.
//! let wrong: Digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000".parse()?;
//! assert!(cache.store(&wrong, &b"other bytes"[..]).await.is_err());
//!
//! let mut blob = cache.open(&digest).await?.expect("cached");
//! let mut bytes = Vec::new();
//! blob.file_mut().read_to_end(&mut bytes).await?;
//! assert_eq!(bytes, layer);
//! assert_eq!(cache.total_bytes().await?, layer.len() as u64);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod cache;
mod content;
mod digest;
mod error;
mod listings;
mod manifests;
mod tags;

pub use cache::{Blob, BlobCache, NAMESPACE};
pub use digest::{Digest, DigestError};
pub use error::{Error, Result};
pub use listings::{Listing, ListingKey, MAX_LISTING_BYTES};
pub use manifests::{
    MANIFEST_NAMESPACE, MAX_MANIFEST_BYTES, Manifest, ManifestCache, ManifestHead, ManifestRef,
    declared_media_type, is_header_text,
};
pub use tags::{AcceptedTypes, MANIFEST_TYPES, TAG_NAMESPACE, TagCache, TagKey, TagRecord};
