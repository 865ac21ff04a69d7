//! `GET|HEAD /v2/<name>/blobs/<digest>`: a hit streams the cached file (with `Range`); a miss
//! joins the one upstream fill of the digest (`BlobCache::fill`) and streams it, or the
//! range asked for, as it arrives. A `HEAD` on a miss asks the upstream once and remembers
//! the size.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use dunite_core::FillError;
use dunite_oci::Digest;

use super::{Error, Mirror, header_value, set_digest};
use crate::metrics::{ByteSource, CacheOutcome};
use crate::peer::Peer;

/// The blob cache's name in `/metrics`.
pub(super) const CACHE: &str = "blobs";

pub(super) async fn blob(
    mirror: &Arc<Mirror>,
    method: &Method,
    (host, name): (&str, &str),
    digest: &Digest,
    peer: Peer,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    // Usage per repository (`/admin/usage`): recorded once the blob is known to exist (a hit,
    // or a fill under way), so requests for digests nobody has add no rows.
    let record_origin =
        || mirror.blobs.entries().entries().record_origin(&digest.to_string(), &format!("{host}/{name}"));
    if let Some(blob) = mirror.blobs.open(digest).await? {
        record_origin();
        mirror.metrics.blob_hit();
        return Ok(serve_file(mirror, method, blob, digest, headers.get(header::RANGE)).await);
    }
    mirror.metrics.blob_miss();
    let upstream_name = mirror.registries.upstream_name(host, name);
    let path = format!("{upstream_name}/blobs/{digest}");
    if *method == Method::HEAD {
        return head(mirror, (host, &upstream_name), &path, digest, peer).await;
    }
    mirror.metrics.refill(CACHE, &digest.to_string());
    let mut joined = join_fill(mirror, (host, upstream_name), digest, peer)?;
    let total = match joined.started().await {
        Ok(started) => {
            record_origin();
            started.total()
        }
        Err(error) if error.is_not_found() => return Err(Error::BlobUnknown),
        Err(error) => return Err(Error::Fill(error)),
    };
    // A `Range` on a miss is cut from the growing spool as soon as its bytes have arrived
    // (lazy-pulling clients ask for a few ranges of a layer). Without an announced length, or
    // with a range that cannot be satisfied, the whole blob is streamed (200): HTTP lets a
    // server ignore `Range`.
    let range = headers
        .get(header::RANGE)
        .zip(total)
        .and_then(|(range, total)| Some((parse_range(range, total)?, total)));
    let (status, start, end) = match range {
        Some(((first, last), _)) => (StatusCode::PARTIAL_CONTENT, first, Some(last + 1)),
        None => (StatusCode::OK, 0, None),
    };
    let served = mirror.metrics.served(CACHE, ByteSource::Upstream);
    let stream = crate::metrics::metered(joined.body(start, end), &served);
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    match (range, total) {
        (Some(((first, last), total)), _) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(last + 1 - first));
            headers.insert(header::CONTENT_RANGE, header_value(&format!("bytes {first}-{last}/{total}")));
        }
        (None, Some(total)) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
        }
        (None, None) => {}
    }
    if total.is_some() {
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    set_digest(headers, digest);
    response.extensions_mut().insert(CacheOutcome::Miss);
    Ok(response)
}

/// A `HEAD` on a blob not cached: the upstream's answer, its size remembered for the tag TTL
/// (`Mirror::blob_heads`, per registry, repository and digest), so a client that asks again
/// (containerd checks a layer before it fetches it) costs no upstream request. Only the
/// blobs found are remembered: a 404 may be pushed over any moment. The upstream request
/// takes a fill permit, as every upstream request a client starts does.
async fn head(
    mirror: &Mirror,
    (host, upstream_name): (&str, &str),
    path: &str,
    digest: &Digest,
    peer: Peer,
) -> Result<Response, Error> {
    let key = (host.to_owned(), upstream_name.to_owned(), digest.clone());
    let (size, outcome) = match mirror.blob_heads.get(&key) {
        Some(size) => (size, CacheOutcome::Hit),
        None => {
            let _permit = mirror.limits.try_start(peer.ip())?;
            let head = mirror.registries.send(host, upstream_name, Method::HEAD, path, None);
            let answer = mirror.metrics.upstream(head).await?;
            match answer.status() {
                s if s.is_success() => {
                    // The header, not `content_length()`: a HEAD's body is empty.
                    let size = answer
                        .headers()
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                    mirror.blob_heads.insert(key, size);
                    (size, CacheOutcome::Miss)
                }
                StatusCode::NOT_FOUND => return Err(Error::BlobUnknown),
                s => return Err(Error::UpstreamStatus(s)),
            }
        }
    };
    let mut response = StatusCode::OK.into_response();
    if let Some(size) = size {
        response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    set_digest(response.headers_mut(), digest);
    response.extensions_mut().insert(outcome);
    Ok(response)
}

/// Join the one upstream fill of `digest` (`BlobCache::fill`) from `host`'s repository
/// `upstream_name`, or start it: the miss path of a blob request, and of a prefetch.
pub(super) fn join_fill(
    mirror: &Arc<Mirror>,
    (host, upstream_name): (&str, String),
    digest: &Digest,
    peer: Peer,
) -> Result<dunite_core::Joined<()>, Error> {
    let path = format!("{upstream_name}/blobs/{digest}");
    let (fill_mirror, fill_host) = (Arc::clone(mirror), host.to_owned());
    let upstream_bytes = mirror.metrics.upstream_bytes();
    // Taken now, used only if this request starts the fill (joining one costs nothing).
    let permit = mirror.limits.try_start(peer.ip());
    Ok(mirror.blobs.fill(digest, move || async move {
        let permit = permit.map_err(FillError::other)?;
        let get = fill_mirror.registries.send(&fill_host, &upstream_name, Method::GET, &path, None);
        let answer = fill_mirror.metrics.upstream(get).await.map_err(FillError::other)?;
        if !answer.status().is_success() {
            return Err(FillError::Refused { status: answer.status().as_u16() });
        }
        let answer_length = answer.content_length();
        let body = crate::upstream::body(answer, &upstream_bytes);
        Ok((answer_length, crate::limits::holding(body, permit)))
    })?)
}

/// Serve a cached blob, whole or one `Range`.
async fn serve_file(
    mirror: &Mirror,
    method: &Method,
    blob: dunite_oci::Blob,
    digest: &Digest,
    range: Option<&HeaderValue>,
) -> Response {
    let size = blob.size();
    let file = blob.into_file();
    let (status, start, len) = match range.map(|r| parse_range(r, size)) {
        None => (StatusCode::OK, 0, size),
        Some(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Some(None) => {
            let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            response.headers_mut().insert(header::CONTENT_RANGE, header_value(&format!("bytes */{size}")));
            return response;
        }
    };
    let body = if *method == Method::HEAD {
        Body::empty()
    } else {
        let served = mirror.metrics.served(CACHE, ByteSource::Cache);
        crate::body::file_body(file.into_std().await, start, len, &served)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        headers.insert(
            header::CONTENT_RANGE,
            header_value(&format!("bytes {start}-{}/{size}", start + len - 1)),
        );
    }
    set_digest(headers, digest);
    response.extensions_mut().insert(CacheOutcome::Hit);
    response
}

/// One `bytes=a-b`, `bytes=a-` or `bytes=-n` range within `size`, as inclusive bounds.
pub(crate) fn parse_range(value: &HeaderValue, size: u64) -> Option<(u64, u64)> {
    let spec = value.to_str().ok()?.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size - 1)
        }
        (a, "") => (a.parse().ok()?, size - 1),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(size - 1)),
    };
    (start <= end && start < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |s: &'static str| parse_range(&HeaderValue::from_static(s), 100);
        assert_eq!(r("bytes=0-9"), Some((0, 9)));
        assert_eq!(r("bytes=90-"), Some((90, 99)));
        assert_eq!(r("bytes=-10"), Some((90, 99)));
        assert_eq!(r("bytes=50-500"), Some((50, 99)));
        assert_eq!(r("bytes=100-"), None);
        assert_eq!(r("bytes=9-0"), None);
        assert_eq!(r("bytes=0-1,5-6"), None);
        assert_eq!(r("items=0-1"), None);
    }
}
