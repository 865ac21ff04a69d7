//! `GET|HEAD /v2/<name>/manifests/<reference>`: by digest from the manifest cache, by tag
//! through the tag cache (fresh for the tag TTL, stale while the upstream is down), else
//! fetched upstream through the one fill of the digest or tag variant
//! (`ManifestCache::fill`): verified, bounded and cached as it arrives.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::Response;
use bytes::Bytes;

use dunite_core::FillError;
use dunite_oci::{Digest, DigestError, Manifest, ManifestHead, ManifestRef, TagKey};

use super::accept::{accept_header, accepted_types, upstream_accept};
use super::{Error, Mirror, header_value, set_digest};
use crate::metrics::CacheOutcome;
use crate::peer::Peer;
use crate::spec::Reference;

/// Every manifest type, for a fetch by digest.
pub(super) const EVERY_MANIFEST_TYPE: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.v1+prettyjws, application/vnd.docker.distribution.manifest.v1+json, \
     application/vnd.oci.artifact.manifest.v1+json";

pub(super) async fn manifest(
    mirror: &Arc<Mirror>,
    method: &Method,
    (host, name): (&str, &str),
    reference: Reference,
    peer: Peer,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let accept = accept_header(headers);
    let upstream_name = mirror.registries.upstream_name(host, name);
    match reference {
        Reference::Digest(digest) => {
            if let Some(manifest) = mirror.manifests.open(&digest).await? {
                mirror.metrics.manifest_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(respond(method, manifest, &digest, CacheOutcome::Hit));
            }
            mirror.metrics.manifest_misses.fetch_add(1, Ordering::Relaxed);
            // A digest fixes the bytes, and its fill is shared by every client that asks for
            // it: the upstream is asked with every manifest type, not the first client's
            // `Accept` (registries refuse an index to a client that does not accept one).
            let every_type = HeaderValue::from_static(EVERY_MANIFEST_TYPE);
            let asked = (&*digest.to_string(), ManifestRef::Digest(&digest));
            let (manifest, _) = fetch(mirror, (host, &upstream_name), peer, asked, Some(&every_type)).await?;
            Ok(respond(method, manifest, &digest, CacheOutcome::Miss))
        }
        Reference::Tag(tag) => {
            let key = TagKey::new(host, name, &tag, accepted_types(&accept));
            let known = mirror.tags.get(&key).await?;
            if let Some(record) = known.as_ref().filter(|record| record.is_fresh())
                && let Some(manifest) = mirror.manifests.open(record.digest()).await?
            {
                mirror.metrics.manifest_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(respond(method, manifest, record.digest(), CacheOutcome::Hit));
            }
            mirror.metrics.manifest_misses.fetch_add(1, Ordering::Relaxed);
            // The upstream is asked for exactly the types the record is keyed on, so what it
            // answers is right for every client that shares the key.
            let asked = upstream_accept(key.types());
            match fetch(mirror, (host, &upstream_name), peer, (&tag, ManifestRef::Tag(&key)), asked.as_ref())
                .await
            {
                // The fill recorded the tag's answer itself (`with_tag_records`).
                Ok((manifest, digest)) => Ok(respond(method, manifest, &digest, CacheOutcome::Miss)),
                Err(error) if error.is_upstream_fault() => {
                    // The upstream is down: serve this variant's last answer, or else the
                    // tag's last answer to anyone if this client accepts its type.
                    let Some(record) = mirror.tags.stale(&key, known).await? else { return Err(error) };
                    let Some(manifest) = mirror.manifests.open(record.digest()).await? else {
                        return Err(error);
                    };
                    tracing::warn!(tag = key.last(), "upstream unreachable; serving the cached tag");
                    mirror.metrics.stale_tags_served.fetch_add(1, Ordering::Relaxed);
                    Ok(respond(method, manifest, record.digest(), CacheOutcome::Stale))
                }
                Err(error) => Err(error),
            }
        }
    }
}

/// Join the one upstream fill of a manifest by digest or tag (`ManifestCache::fill`): it is
/// verified, bounded and cached by digest as it arrives; once it is, read it whole. Returns
/// the manifest and its digest.
async fn fetch(
    mirror: &Arc<Mirror>,
    (host, upstream_name): (&str, &str),
    peer: Peer,
    (reference, asked): (&str, ManifestRef<'_>),
    accept: Option<&HeaderValue>,
) -> Result<(Manifest, Digest), Error> {
    let path = format!("{upstream_name}/manifests/{reference}");
    let (fill_mirror, host, upstream_name) = (Arc::clone(mirror), host.to_owned(), upstream_name.to_owned());
    let (accept, upstream_bytes) = (accept.cloned(), Arc::clone(&mirror.metrics.upstream_bytes));
    // Taken now, used only if this request starts the fill.
    let permit = mirror.limits.try_start(peer.ip());
    let joined = mirror.manifests.fill(asked, move || async move {
        let permit = permit.map_err(FillError::other)?;
        let answer = fill_mirror
            .registries
            .send(&host, &upstream_name, Method::GET, &path, accept.as_ref())
            .await
            .map_err(FillError::other)?;
        if !answer.status().is_success() {
            return Err(FillError::Refused { status: answer.status().as_u16() });
        }
        let media_type = answer
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_owned();
        // The bytes of a tag are verified against the digest announced, by its algorithm
        // (sha512 if so announced, else sha256).
        let announced = match answer.headers().get("docker-content-digest") {
            None => None,
            Some(value) => {
                let announced = String::from_utf8_lossy(value.as_bytes()).into_owned();
                match announced.parse::<Digest>() {
                    Ok(digest) => Some(digest),
                    Err(source) => return Err(FillError::other(BadAnnouncement { announced, source })),
                }
            }
        };
        let total = answer.content_length();
        let body = crate::limits::holding(crate::upstream::body(answer, &upstream_bytes), permit);
        Ok((ManifestHead::new(media_type, announced), total, body))
    })?;
    let digest = match asked {
        ManifestRef::Digest(digest) => Some(digest),
        ManifestRef::Tag(_) => None,
    };
    let (manifest, digest) =
        mirror.manifests.read_fill(joined).await.map_err(|error| Error::from_manifest_fill(error, digest))?;
    Ok((manifest, digest))
}

/// The upstream announced a `Docker-Content-Digest` that is no digest.
#[derive(Debug, thiserror::Error)]
#[error("upstream announced the digest {announced:?}")]
struct BadAnnouncement {
    announced: String,
    #[source]
    source: DigestError,
}

fn respond(method: &Method, manifest: Manifest, digest: &Digest, outcome: CacheOutcome) -> Response {
    let (bytes, media_type) = manifest.into_parts();
    let len = bytes.len() as u64;
    let body = if *method == Method::HEAD { Body::empty() } else { Body::from(Bytes::from(bytes)) };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header_value(&media_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    set_digest(headers, digest);
    response.extensions_mut().insert(outcome);
    response
}

#[cfg(test)]
mod tests {
    use super::EVERY_MANIFEST_TYPE;

    /// A fetch by digest accepts every manifest type the tag cache knows (but the wildcard).
    #[test]
    fn a_fetch_by_digest_accepts_every_manifest_type() {
        let accepted: Vec<&str> = EVERY_MANIFEST_TYPE.split(',').map(str::trim).collect();
        for media_type in dunite_oci::MANIFEST_TYPES.iter().filter(|t| **t != "*/*") {
            assert!(accepted.contains(media_type), "{media_type}");
        }
    }
}
