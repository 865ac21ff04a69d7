//! The JSON of the admin API (`/admin/`): what the server answers and `dunite admin` reads.
//! One definition for both sides, so they cannot drift apart.

use serde::{Deserialize, Serialize};

/// `GET /admin/caches`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Caches {
    /// Every cache.
    pub caches: Vec<CacheSummary>,
}

/// One cache's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheSummary {
    /// `blobs`, `manifests`, `tags` or `downloads`.
    pub name: String,
    /// Accounted bytes.
    pub bytes: u64,
    /// The cap.
    pub max_bytes: u64,
    /// Entries.
    pub entries: u64,
    /// Bytes of the pinned entries (part of `bytes`).
    pub pinned_bytes: u64,
}

/// `GET /admin/caches/{cache}/entries?order=recent|size&limit=N&cursor=C`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entries {
    /// The cache listed.
    pub cache: String,
    /// One page, in the order asked for.
    pub entries: Vec<Entry>,
    /// The cursor of the next page (`cursor=`), absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// One entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Its key: a digest, a tag variant, or a download's URL.
    pub key: String,
    /// Payload bytes.
    pub size: u64,
    /// Last stored or read, in milliseconds since the Unix epoch (reads of the last second or
    /// so may not show yet).
    pub last_used_ms: i64,
    /// Stored or last revalidated, in milliseconds since the Unix epoch.
    pub stored_at_ms: i64,
    /// Pinned by an operator.
    pub pinned: bool,
}

/// `GET /admin/usage`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Usage {
    /// Per repository (`registry/name`), largest first.
    pub repositories: Vec<RepositoryUsage>,
    /// How shared blobs are counted.
    pub note: String,
}

/// One repository's share of the blob and manifest caches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepositoryUsage {
    /// `registry/name`.
    pub repository: String,
    /// Bytes of the blobs and manifests pulled through it, shared ones counted in full.
    pub bytes: u64,
    /// Entries pulled through it.
    pub entries: u64,
    /// Bytes no other repository pulled: what a purge of the repository frees.
    pub exclusive_bytes: u64,
}

/// The body of `POST /admin/purge`, `/admin/pin` and `/admin/unpin`: exactly one field.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// A blob or manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// A repository, `registry/name` (purge only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// A download's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// What `POST /admin/purge` removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Purged {
    /// Each entry removed.
    pub removed: Vec<Removed>,
    /// For a repository: entries it shares with other repositories, kept.
    #[serde(default)]
    pub shared_kept: Vec<String>,
}

/// One entry a purge removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Removed {
    /// Its cache.
    pub cache: String,
    /// Its key.
    pub key: String,
    /// Bytes freed.
    pub bytes: u64,
}

/// What `POST /admin/pin` or `/admin/unpin` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pinned {
    /// The entry's cache.
    pub cache: String,
    /// Its key.
    pub key: String,
    /// Its size.
    pub size: u64,
    /// Whether it is pinned now.
    pub pinned: bool,
}

/// The body of `POST /admin/prefetch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefetchRequest {
    /// `[registry/]repository[:tag|@digest]`.
    pub image: String,
    /// `os/arch[/variant]` or `all` [default: `linux/amd64`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

/// A prefetch job: `POST /admin/prefetch` answers it (202) and `GET /admin/prefetch/{id}`
/// reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefetchJob {
    /// The job's id.
    pub id: u64,
    /// The image asked for.
    pub image: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// Manifests fetched.
    pub manifests: u64,
    /// Blobs to fetch (known once the manifests are read).
    pub blobs_total: u64,
    /// Blobs cached so far.
    pub blobs_done: u64,
    /// Of those, blobs that were cached before.
    pub blobs_cached: u64,
    /// Bytes to fetch.
    pub bytes_total: u64,
    /// Bytes cached so far.
    pub bytes_done: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every error answer: a status and this body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    /// What went wrong.
    pub error: String,
}
