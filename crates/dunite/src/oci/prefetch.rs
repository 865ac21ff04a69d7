//! Prefetch: pull an image into the cache ahead of its clients, through the same paths a pull
//! takes. The manifest by tag or digest goes through the manifest handler's own code (tag
//! cache, manifest fill), an index is narrowed to one platform or kept whole, and every config
//! and layer joins the blob's one upstream fill (`blobs::join_fill`, as a blob miss does),
//! a few at a time.
//! Blobs already cached are counted as done without a transfer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, HeaderValue, Method, header};

use dunite_oci::{Digest, MAX_MANIFEST_BYTES};

use futures_util::StreamExt as _;

use super::{Error, Mirror, blobs, manifests};
use crate::peer::Peer;
use crate::spec::Reference;

/// Blobs of one prefetch fetched at once.
const CONCURRENT_BLOBS: usize = 4;

/// Which manifests of an index to prefetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Platform {
    /// Every one.
    All,
    /// The one for `os/architecture[/variant]`.
    One { os: String, architecture: String, variant: Option<String> },
}

impl std::str::FromStr for Platform {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "all" {
            return Ok(Self::All);
        }
        let mut parts = text.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(os), Some(architecture), variant, None) if !os.is_empty() && !architecture.is_empty() => {
                Ok(Self::One {
                    os: os.to_owned(),
                    architecture: architecture.to_owned(),
                    variant: variant.filter(|v| !v.is_empty()).map(str::to_owned),
                })
            }
            _ => Err(format!("platform {text:?} is not `os/arch[/variant]` or `all`")),
        }
    }
}

impl Platform {
    /// Whether an index entry's `platform` object is this one.
    fn matches(&self, platform: Option<&serde_json::Value>) -> bool {
        let Self::One { os, architecture, variant } = self else { return true };
        let Some(platform) = platform else { return false };
        let field = |name: &str| platform.get(name).and_then(|v| v.as_str());
        field("os") == Some(os)
            && field("architecture") == Some(architecture)
            && variant.as_deref().is_none_or(|variant| field("variant") == Some(variant))
    }
}

/// How far a prefetch is; read while it runs.
#[derive(Debug, Default)]
pub(crate) struct PrefetchProgress {
    /// Manifests fetched (an index and the platform manifests it names count each).
    pub(crate) manifests: AtomicU64,
    /// Blobs (configs and layers) to fetch, once the manifests are read.
    pub(crate) blobs_total: AtomicU64,
    /// Blobs in the cache so far.
    pub(crate) blobs_done: AtomicU64,
    /// Of those, blobs that were cached already.
    pub(crate) blobs_cached: AtomicU64,
    /// Bytes of the blobs to fetch, as the manifests declare them.
    pub(crate) bytes_total: AtomicU64,
    /// Bytes of the blobs in the cache so far.
    pub(crate) bytes_done: AtomicU64,
}

/// Why a prefetch failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PrefetchError {
    /// What a pull of the same manifest or blob would have answered.
    #[error(transparent)]
    Pull(#[from] Error),
    /// A manifest that is not an image manifest or index this prefetch can read.
    #[error("cannot read manifest {digest}: {reason}")]
    Manifest { digest: String, reason: String },
    /// The index has no manifest for the platform asked for.
    #[error("the image has no manifest for platform {0}")]
    NoPlatform(String),
}

impl PrefetchError {
    /// Whether the client asked for something wrong or absent (rather than the mirror or the
    /// upstream failing).
    pub(crate) fn is_client_error(&self) -> bool {
        match self {
            Self::Pull(error) => error.status().is_client_error(),
            Self::Manifest { .. } | Self::NoPlatform(_) => true,
        }
    }
}

impl Mirror {
    /// Split `[registry/]repository[:tag|@digest]` (`latest` if neither): a first component
    /// naming a configured registry is the registry, otherwise the default one is meant.
    pub(crate) fn parse_image(&self, image: &str) -> Result<(String, String, Reference), Error> {
        let (host, rest) = match image.split_once('/') {
            Some((first, rest)) if self.registries.knows(first) => (first.to_owned(), rest),
            _ => (self.default_registry.clone(), image),
        };
        let (name, reference) = if let Some((name, digest)) = rest.split_once('@') {
            (name, digest)
        } else {
            match rest.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => (name, tag),
                _ => (rest, "latest"),
            }
        };
        if !crate::spec::is_valid_name(name) {
            return Err(Error::NameInvalid);
        }
        Ok((host, name.to_owned(), Reference::parse(reference)?))
    }

    /// Fetch `host`'s image `name` at `reference` into the caches: its manifest (by tag
    /// through the tag cache), the platform manifests of an index (those of `platform`), and
    /// every config and layer, each through the fill a pull would join. Returns when every
    /// blob is cached, counting in `progress` as it goes. Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`PrefetchError`]: what a pull would have answered, or a manifest it cannot read.
    pub(crate) async fn prefetch(
        self: &Arc<Self>,
        (host, name): (&str, &str),
        reference: Reference,
        platform: &Platform,
        progress: &PrefetchProgress,
    ) -> Result<(), PrefetchError> {
        let origin = format!("{host}/{name}");
        let (digest, top) = self.fetch_manifest((host, name), reference, &origin).await?;
        progress.manifests.fetch_add(1, Ordering::Relaxed);
        let mut images = Vec::new();
        if let Some(entries) = top.get("manifests").and_then(|m| m.as_array()) {
            for entry in entries.iter().filter(|entry| platform.matches(entry.get("platform"))) {
                let child = descriptor(entry, &digest)?.0;
                let (child, manifest) =
                    self.fetch_manifest((host, name), Reference::Digest(child), &origin).await?;
                progress.manifests.fetch_add(1, Ordering::Relaxed);
                images.push((child, manifest));
            }
            if images.is_empty() {
                let shown = match platform {
                    Platform::All => "any".to_owned(),
                    Platform::One { os, architecture, variant } => {
                        format!(
                            "{os}/{architecture}{}",
                            variant.as_ref().map(|v| format!("/{v}")).unwrap_or_default()
                        )
                    }
                };
                return Err(PrefetchError::NoPlatform(shown));
            }
        } else {
            images.push((digest, top));
        }
        // Each blob once, however many platforms share it.
        let mut blobs = BTreeMap::new();
        for (digest, manifest) in &images {
            let config = manifest.get("config").ok_or_else(|| PrefetchError::Manifest {
                digest: digest.to_string(),
                reason: "no config (not an image manifest)".to_owned(),
            })?;
            let layers =
                manifest.get("layers").and_then(|l| l.as_array()).map(Vec::as_slice).unwrap_or_default();
            for described in std::iter::once(config).chain(layers) {
                let (blob, size) = descriptor(described, digest)?;
                blobs.insert(blob.to_string(), (blob, size));
            }
        }
        progress.blobs_total.store(blobs.len() as u64, Ordering::Relaxed);
        progress.bytes_total.store(blobs.values().map(|(_, size)| size).sum(), Ordering::Relaxed);
        let upstream_name = self.registries.upstream_name(host, name);
        let fetches = blobs.into_iter().map(|(key, (blob, size))| {
            let (origin, upstream_name) = (&origin, upstream_name.clone());
            async move {
                self.blobs.entries().entries().record_origin(&key, origin);
                if self.blobs.contains(&blob).await.map_err(Error::from)? {
                    progress.blobs_cached.fetch_add(1, Ordering::Relaxed);
                } else {
                    let mut joined = blobs::join_fill(self, (host, upstream_name), &blob, Peer(None))?;
                    match joined.finished().await {
                        Ok(_) => {}
                        Err(error) if error.is_not_found() => return Err(Error::BlobUnknown),
                        Err(error) => return Err(Error::Fill(error)),
                    }
                }
                progress.blobs_done.fetch_add(1, Ordering::Relaxed);
                progress.bytes_done.fetch_add(size, Ordering::Relaxed);
                Ok(())
            }
        });
        // A few at a time: a layer's transfer overlaps the next one's round trips, and a
        // prefetch takes few of the server's fill permits (`--max-fills`).
        let mut fetching = futures_util::stream::iter(fetches).buffer_unordered(CONCURRENT_BLOBS);
        while let Some(fetched) = fetching.next().await {
            fetched?;
        }
        Ok(())
    }

    /// A manifest through the manifest handler's own path, parsed; with its digest.
    async fn fetch_manifest(
        self: &Arc<Self>,
        (host, name): (&str, &str),
        reference: Reference,
        origin: &str,
    ) -> Result<(Digest, serde_json::Value), PrefetchError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(manifests::EVERY_MANIFEST_TYPE));
        let response =
            manifests::manifest(self, &Method::GET, (host, name), reference, Peer(None), &headers).await?;
        let digest: Digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| PrefetchError::Manifest {
                digest: "?".to_owned(),
                reason: "no digest".to_owned(),
            })?;
        self.manifests.entries().entries().record_origin(&digest.to_string(), origin);
        let unreadable = |reason: String| PrefetchError::Manifest { digest: digest.to_string(), reason };
        let bytes = axum::body::to_bytes(
            response.into_body(),
            usize::try_from(MAX_MANIFEST_BYTES).unwrap_or(usize::MAX),
        )
        .await
        .map_err(|e| unreadable(e.to_string()))?;
        let parsed = serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
        Ok((digest, parsed))
    }
}

/// The digest and size of a descriptor in the manifest `within`.
fn descriptor(described: &serde_json::Value, within: &Digest) -> Result<(Digest, u64), PrefetchError> {
    let bad =
        |reason: &str| PrefetchError::Manifest { digest: within.to_string(), reason: reason.to_owned() };
    let digest = described
        .get("digest")
        .and_then(|d| d.as_str())
        .ok_or_else(|| bad("a descriptor without a digest"))?;
    let digest = digest.parse().map_err(|_| bad("a descriptor with a malformed digest"))?;
    let size = described
        .get("size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| bad("a descriptor without a size"))?;
    Ok((digest, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let arm: Platform = "linux/arm64/v8".parse().unwrap();
        let entry = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        assert!(arm.matches(Some(&entry)) && !amd64.matches(Some(&entry)));
        assert!(Platform::All.matches(None) && !amd64.matches(None));
        for bad in ["linux", "linux/", "a/b/c/d", ""] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }
}
