//! `GET|HEAD /v2/<name>/manifests/<reference>`: by digest from the manifest cache, by tag
//! through the tag cache (fresh for the tag TTL, stale while the upstream is down), else
//! fetched upstream, verified and cached.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;

use dunite_core::{ContentDigest, DigestAlgorithm};
use dunite_oci::{Digest, Manifest, TagKey};

use super::accept::{accept_header, accepted_types, upstream_accept};
use super::{Error, Mirror, header_value, set_digest};
use crate::metrics::CacheOutcome;
use crate::spec::Reference;

/// Manifests larger than this are refused (the spec suggests registries cap them at 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;

pub(super) async fn manifest(
    mirror: &Arc<Mirror>,
    method: &Method,
    host: &str,
    name: &str,
    reference: Reference,
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
            let (manifest, fetched) =
                fetch(mirror, host, &upstream_name, &digest.to_string(), Some(&accept)).await?;
            if fetched != digest {
                return Err(Error::ManifestMismatch { asked: digest, got: fetched });
            }
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
            match fetch(mirror, host, &upstream_name, &tag, asked.as_ref()).await {
                Ok((manifest, digest)) => {
                    mirror.tags.record(&key, &digest, manifest.media_type()).await?;
                    Ok(respond(method, manifest, &digest, CacheOutcome::Miss))
                }
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

/// Fetch a manifest by tag or digest, verify and cache it by digest.
async fn fetch(
    mirror: &Mirror,
    host: &str,
    upstream_name: &str,
    reference: &str,
    accept: Option<&HeaderValue>,
) -> Result<(Manifest, Digest), Error> {
    let path = format!("{upstream_name}/manifests/{reference}");
    let response = mirror.registries.send(host, upstream_name, Method::GET, &path, accept).await?;
    match response.status() {
        s if s.is_success() => {}
        StatusCode::NOT_FOUND => return Err(Error::ManifestUnknown),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(Error::Unauthorized),
        s => return Err(Error::UpstreamStatus(s)),
    }
    let media_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_owned();
    let announced =
        response.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let bytes = crate::upstream::read_limited(response, MAX_MANIFEST)
        .await
        .map_err(Error::UpstreamBody)?
        .ok_or(Error::ManifestTooLarge)?;
    mirror.metrics.upstream_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    // Address by the upstream's announced algorithm if it is sha512, else sha256.
    let algorithm = match announced.as_deref() {
        Some(d) if d.starts_with("sha512:") => DigestAlgorithm::Sha512,
        _ => DigestAlgorithm::Sha256,
    };
    let digest = Digest::from(ContentDigest::of(algorithm, &bytes));
    if let Some(announced) = announced
        && announced != digest.to_string()
    {
        return Err(Error::AnnouncedMismatch { announced, computed: digest });
    }
    match mirror.manifests.store(&digest, &bytes, &media_type).await {
        Ok(_) => {}
        // Verified, but not recorded: serve it, cache it next time.
        Err(error) if error.is_database() => {
            tracing::warn!(%error, %digest, "database unavailable; manifest served uncached");
        }
        Err(error) => return Err(error.into()),
    }
    let manifest = Manifest::new(Vec::from(bytes), media_type);
    Ok((manifest, digest))
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
