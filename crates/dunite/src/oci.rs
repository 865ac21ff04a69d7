//! The OCI distribution pull API, as a pull-through mirror.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use dunite_core::{ContentDigest, DigestAlgorithm, Expected, FillError};
use dunite_oci::Digest;

use crate::app::{App, CacheOutcome};
use crate::spec::{Reference, SpecError, is_valid_name};

/// Manifests larger than this are refused (the spec suggests registries cap them at 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;

/// What clients accept when they do not say.
const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// `?ns=<registry host>`, as containerd sends it to a mirror.
#[derive(Debug, Deserialize)]
pub(crate) struct NsQuery {
    ns: Option<String>,
}

/// What the tag cache records for a tag.
#[derive(Debug, Serialize, Deserialize)]
struct TagRecord {
    digest: String,
    media_type: String,
}

/// `GET /v2/`.
pub(crate) async fn root() -> Response {
    ([("docker-distribution-api-version", "registry/2.0"), ("content-type", "application/json")], "{}")
        .into_response()
}

/// `GET|HEAD /v2/<name>/manifests/<reference>` and `/v2/<name>/blobs/<digest>`.
pub(crate) async fn dispatch(
    State(app): State<Arc<App>>,
    method: Method,
    Path(rest): Path<String>,
    Query(query): Query<NsQuery>,
    headers: HeaderMap,
) -> Response {
    match route(&app, &method, &rest, query, &headers).await {
        Ok(response) => response,
        Err(error) => {
            if error.status.is_server_error() {
                app.metrics.errors.fetch_add(1, Ordering::Relaxed);
            }
            error.into_response()
        }
    }
}

async fn route(
    app: &Arc<App>,
    method: &Method,
    rest: &str,
    query: NsQuery,
    headers: &HeaderMap,
) -> Result<Response, SpecError> {
    if *method != Method::GET && *method != Method::HEAD {
        return Err(SpecError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this mirror only serves pulls",
        ));
    }
    let mut parts = rest.rsplitn(3, '/');
    let (reference, kind, name) = match (parts.next(), parts.next(), parts.next()) {
        (Some(r), Some(k), Some(n)) => (r, k, n),
        _ => return Err(SpecError::unsupported("unknown endpoint")),
    };
    if !is_valid_name(name) {
        return Err(SpecError::name_invalid());
    }
    let host = query.ns.unwrap_or_else(|| app.config.default_registry.clone());
    if !app.registries.knows(&host) {
        return Err(SpecError::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("no upstream for registry {host:?}"),
        ));
    }
    match kind {
        "blobs" => {
            let digest: Digest = reference
                .parse()
                .map_err(|e: dunite_oci::DigestError| SpecError::digest_invalid(&e.to_string()))?;
            blob(app, method, &host, name, &digest, headers).await
        }
        "manifests" => manifest(app, method, &host, name, Reference::parse(reference)?, headers).await,
        _ => Err(SpecError::unsupported("unknown endpoint")),
    }
}

async fn blob(
    app: &Arc<App>,
    method: &Method,
    host: &str,
    name: &str,
    digest: &Digest,
    headers: &HeaderMap,
) -> Result<Response, SpecError> {
    if let Some(blob) = app.blobs.open(digest).await.map_err(internal)? {
        app.metrics.blob_hits.fetch_add(1, Ordering::Relaxed);
        return serve_file(app, method, blob, digest, headers.get(header::RANGE), CacheOutcome::Hit).await;
    }
    app.metrics.blob_misses.fetch_add(1, Ordering::Relaxed);
    let upstream_name = app.registries.upstream_name(host, name);
    let path = format!("{upstream_name}/blobs/{digest}");
    if *method == Method::HEAD {
        let answer =
            app.registries.send(host, &upstream_name, Method::HEAD, &path, None).await.map_err(upstream)?;
        return match answer.status() {
            s if s.is_success() => {
                let mut response = StatusCode::OK.into_response();
                copy_header(answer.headers(), response.headers_mut(), header::CONTENT_LENGTH);
                set_digest(response.headers_mut(), digest);
                response.extensions_mut().insert(CacheOutcome::Miss);
                Ok(response)
            }
            StatusCode::NOT_FOUND => Err(SpecError::blob_unknown()),
            s => Err(SpecError::upstream(format!("upstream answered {s}"))),
        };
    }
    let (fill_app, fill_host) = (Arc::clone(app), host.to_owned());
    let upstream_bytes = Arc::clone(&app.metrics.upstream_bytes);
    let mut joined = app
        .blobs
        .fill(digest, move || async move {
            let answer = fill_app
                .registries
                .send(&fill_host, &upstream_name, Method::GET, &path, None)
                .await
                .map_err(FillError::other)?;
            if !answer.status().is_success() {
                return Err(FillError::Refused { status: answer.status().as_u16() });
            }
            Ok((answer.content_length(), upstream_body(answer, upstream_bytes)))
        })
        .map_err(internal)?;
    let total = match joined.started().await {
        Ok(started) => started.total(),
        Err(error) => return Err(fill_failed(&error)),
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
    let stream = crate::metrics::metered(joined.body(start, end), &app.metrics.bytes_served);
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

/// An upstream's body as the fill reads it: its URL redacted from errors, its bytes counted.
fn upstream_body(
    answer: reqwest::Response,
    counter: Arc<std::sync::atomic::AtomicU64>,
) -> impl futures_util::Stream<Item = Result<Bytes, reqwest::Error>> + Send {
    use futures_util::StreamExt as _;
    answer.bytes_stream().map(move |chunk| {
        let chunk = chunk.map_err(crate::upstream::redact)?;
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok(chunk)
    })
}

/// A failed blob fill, as the client sees it.
fn fill_failed(error: &FillError) -> SpecError {
    match error {
        FillError::Refused { status: 404 } => SpecError::blob_unknown(),
        FillError::Local(_) => {
            tracing::warn!(error = %crate::error_chain(error), "a blob fill failed locally");
            SpecError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", crate::error_chain(error))
        }
        FillError::TimedOut { .. } => {
            SpecError::new(StatusCode::GATEWAY_TIMEOUT, "UNKNOWN", crate::error_chain(error))
        }
        _ => SpecError::upstream(crate::error_chain(error)),
    }
}

/// Serve a cached blob, whole or one `Range`.
async fn serve_file(
    app: &App,
    method: &Method,
    blob: dunite_oci::Blob,
    digest: &Digest,
    range: Option<&HeaderValue>,
    outcome: CacheOutcome,
) -> Result<Response, SpecError> {
    let size = blob.size();
    let file = blob.into_file();
    let (status, start, len) = match range.map(|r| parse_range(r, size)) {
        None => (StatusCode::OK, 0, size),
        Some(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Some(None) => {
            let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            response.headers_mut().insert(header::CONTENT_RANGE, header_value(&format!("bytes */{size}")));
            return Ok(response);
        }
    };
    let body = if *method == Method::HEAD {
        Body::empty()
    } else {
        crate::body::file_body(file.into_std().await, start, len, &app.metrics.bytes_served)
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
    response.extensions_mut().insert(outcome);
    Ok(response)
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

async fn manifest(
    app: &Arc<App>,
    method: &Method,
    host: &str,
    name: &str,
    reference: Reference,
    headers: &HeaderMap,
) -> Result<Response, SpecError> {
    let accept = accept_header(headers);
    let upstream_name = app.registries.upstream_name(host, name);
    match reference {
        Reference::Digest(digest) => {
            if let Some((bytes, media_type)) = cached_manifest(app, &digest).await? {
                app.metrics.manifest_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(manifest_response(method, bytes, &media_type, &digest, CacheOutcome::Hit));
            }
            app.metrics.manifest_misses.fetch_add(1, Ordering::Relaxed);
            let (bytes, media_type, fetched) =
                fetch_manifest(app, host, &upstream_name, &digest.to_string(), Some(&accept)).await?;
            if fetched != digest {
                return Err(SpecError::upstream(format!(
                    "upstream manifest digest {fetched} is not {digest}"
                )));
            }
            Ok(manifest_response(method, bytes, &media_type, &digest, CacheOutcome::Miss))
        }
        Reference::Tag(tag) => {
            let keys = TagKeys::new(host, name, &tag, &accept);
            let known = tag_record(app, &keys.variant).await?;
            if let Some((record, stored_at_ms)) = &known
                && now_ms().saturating_sub(*stored_at_ms)
                    < i64::try_from(app.config.tag_ttl.as_millis()).unwrap_or(i64::MAX)
                && let Ok(digest) = record.digest.parse::<Digest>()
                && let Some((bytes, media_type)) = cached_manifest(app, &digest).await?
            {
                app.metrics.manifest_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(manifest_response(method, bytes, &media_type, &digest, CacheOutcome::Hit));
            }
            app.metrics.manifest_misses.fetch_add(1, Ordering::Relaxed);
            // The upstream is asked for exactly the types the record is keyed on, so what it
            // answers is right for every client that shares the key.
            let asked = keys.upstream_accept();
            match fetch_manifest(app, host, &upstream_name, &tag, asked.as_ref()).await {
                Ok((bytes, media_type, digest)) => {
                    let record = TagRecord { digest: digest.to_string(), media_type: media_type.clone() };
                    let meta =
                        serde_json::to_string(&record).map_err(|e| SpecError::upstream(e.to_string()))?;
                    // The record is also the payload, so each counts against the tag cap by
                    // its size (an empty payload would never be evicted); reads use the meta.
                    let payload = meta.as_bytes();
                    let expected = Expected::new().with_size(payload.len() as u64);
                    for key in [&keys.variant, &keys.last] {
                        tolerate_database(app.tags.store(key, payload, &expected, &meta).await, "tag")?;
                    }
                    Ok(manifest_response(method, bytes, &media_type, &digest, CacheOutcome::Miss))
                }
                Err(error) if error.status == StatusCode::BAD_GATEWAY => {
                    // The upstream is down: serve this variant's last answer, or else the
                    // tag's last answer to anyone if this client accepts its type.
                    let known = match known {
                        Some(known) => Some(known),
                        None => {
                            tag_record(app, &keys.last).await?.filter(|(r, _)| keys.may_serve(&r.media_type))
                        }
                    };
                    let stale = match known {
                        Some((record, _)) => match record.digest.parse::<Digest>() {
                            Ok(digest) => cached_manifest(app, &digest).await?.map(|m| (m, digest)),
                            Err(_) => None,
                        },
                        None => None,
                    };
                    let Some(((bytes, media_type), digest)) = stale else { return Err(error) };
                    tracing::warn!(tag = keys.last, "upstream unreachable; serving the cached tag");
                    app.metrics.stale_tags_served.fetch_add(1, Ordering::Relaxed);
                    Ok(manifest_response(method, bytes, &media_type, &digest, CacheOutcome::Stale))
                }
                Err(error) => Err(error),
            }
        }
    }
}

/// The client's `Accept`: every `Accept` header it sent, joined (some clients send one per
/// media type), or what clients accept when they do not say.
fn accept_header(headers: &HeaderMap) -> HeaderValue {
    let values: Vec<&[u8]> = headers.get_all(header::ACCEPT).iter().map(HeaderValue::as_bytes).collect();
    if values.is_empty() {
        return HeaderValue::from_static(DEFAULT_ACCEPT);
    }
    HeaderValue::from_bytes(&values.join(&b", "[..]))
        .unwrap_or_else(|_| HeaderValue::from_static(DEFAULT_ACCEPT))
}

/// Manifest media types as clients name them in `Accept`. The tag cache keys on these alone:
/// registries ignore other types, and keying on them would let a client mint variants.
pub(crate) const MANIFEST_TYPES: &[&str] = &[
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

/// A media type as compared here: without parameters, lower case.
fn bare_type(media_type: &str) -> String {
    media_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Where a tag's records live in the tag cache.
///
/// A registry answers a tag by what the client accepts (an index, one platform's manifest, or
/// a 404 to a client that takes no index), so the mirror keeps one answer per set of accepted
/// manifest types (`variant`), as an HTTP cache honours `Vary: Accept`, and asks the upstream
/// for exactly that set: an old client's single-platform manifest never reaches a client
/// that asked for the index, nor the reverse. Order, parameters, case, repeated headers and
/// types that are not manifest types do not matter; a type with `q=0` is refused. The tag's
/// latest answer to anyone is also kept (`last`), for clients it suits while the upstream is
/// down ([`may_serve`](Self::may_serve)).
#[derive(Debug)]
pub(crate) struct TagKeys {
    /// `<host>/<name>:<tag>@<16 hex digits of the sha256 of the sorted accepted types>`.
    pub(crate) variant: String,
    /// `<host>/<name>:<tag>`.
    pub(crate) last: String,
    /// Accepted manifest types (and `*/*`), sorted.
    pub(crate) accepted: Vec<String>,
    /// Types refused with `q=0`.
    refused: Vec<String>,
}

impl TagKeys {
    pub(crate) fn new(host: &str, name: &str, tag: &str, accept: &HeaderValue) -> Self {
        let (mut accepted, mut refused) = (Vec::new(), Vec::new());
        for item in String::from_utf8_lossy(accept.as_bytes()).split(',') {
            let media_type = bare_type(item);
            let zero = item.split(';').skip(1).any(|param| {
                let param = param.trim().to_ascii_lowercase();
                param.strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
            });
            if zero {
                refused.push(media_type);
            } else if MANIFEST_TYPES.contains(&media_type.as_str()) {
                accepted.push(media_type);
            }
        }
        accepted.retain(|t| !refused.contains(t));
        accepted.sort_unstable();
        accepted.dedup();
        let fingerprint = ContentDigest::of(DigestAlgorithm::Sha256, accepted.join(",").as_bytes()).hex();
        let last = format!("{host}/{name}:{tag}");
        Self { variant: format!("{last}@{}", &fingerprint[..16]), last, accepted, refused }
    }

    /// The `Accept` to send upstream: the accepted set, or none when it is empty.
    pub(crate) fn upstream_accept(&self) -> Option<HeaderValue> {
        if self.accepted.is_empty() {
            return None;
        }
        HeaderValue::from_str(&self.accepted.join(", ")).ok()
    }

    /// Whether the tag's last answer, of `media_type`, may be served to this client: it accepts
    /// the type (and did not refuse it), and a single manifest (one platform's) is not served
    /// to a client that asked for an index or list, which would get the wrong platform.
    pub(crate) fn may_serve(&self, media_type: &str) -> bool {
        let media_type = bare_type(media_type);
        let accepted = !self.refused.contains(&media_type)
            && self.accepted.iter().any(|t| *t == media_type || t == "*/*");
        let is_list = LIST_TYPES.contains(&media_type.as_str());
        let wants_list = self.accepted.iter().any(|t| LIST_TYPES.contains(&t.as_str()));
        accepted && (is_list || !wants_list)
    }
}

async fn tag_record(app: &App, key: &str) -> Result<Option<(TagRecord, i64)>, SpecError> {
    let info = match app.tags.info(key).await {
        Ok(Some(info)) => info,
        Ok(None) => return Ok(None),
        // Without the database, resolve the tag upstream.
        Err(e) if e.is_database() => {
            tracing::warn!(error = %e, tag = key, "database unavailable; resolving the tag upstream");
            return Ok(None);
        }
        Err(e) => return Err(core_internal(e)),
    };
    Ok(serde_json::from_str(&info.meta).ok().map(|record| (record, info.stored_at_ms)))
}

async fn cached_manifest(app: &App, digest: &Digest) -> Result<Option<(Bytes, String)>, SpecError> {
    let read = |e: std::io::Error| SpecError::upstream(e.to_string());
    let key = digest.to_string();
    match app.manifests.open_entry(&key).await {
        Ok(None) => Ok(None),
        Ok(Some(mut entry)) => {
            let mut bytes = Vec::new();
            entry.file.read_to_end(&mut bytes).await.map_err(read)?;
            Ok(Some((Bytes::from(bytes), entry.info.meta)))
        }
        // Without the database: a verified copy on disk; the media type was in the row, so
        // take it from the manifest itself.
        Err(e) if e.is_database_unavailable() => {
            tracing::warn!(error = %e, %digest, "database unavailable; looking for the manifest on disk");
            let Some((mut file, _)) =
                app.manifests.open_unindexed(&key, digest.content_digest()).await.map_err(core_internal)?
            else {
                return Ok(None);
            };
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).await.map_err(read)?;
            let media_type = declared_media_type(&bytes);
            Ok(Some((Bytes::from(bytes), media_type)))
        }
        Err(e) => Err(core_internal(e)),
    }
}

/// The `mediaType` a manifest declares; without one (or with an empty one, or one that cannot be
/// a header value), the OCI index type for a document with `manifests`, else the OCI image manifest type.
pub(crate) fn declared_media_type(manifest: &[u8]) -> String {
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
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

/// Whether `text` is a non-empty header value.
pub(crate) fn is_header_text(text: &str) -> bool {
    !text.is_empty() && HeaderValue::from_str(text).is_ok()
}

/// Keep a verified entry if the database lets us; without it, serve uncached.
fn tolerate_database(
    result: Result<dunite_core::Stored, dunite_core::Error>,
    what: &str,
) -> Result<(), SpecError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.is_database() => {
            tracing::warn!(error = %e, what, "database unavailable; served uncached");
            Ok(())
        }
        Err(e) => Err(core_internal(e)),
    }
}

/// Fetch a manifest by tag or digest, verify and cache it by digest.
async fn fetch_manifest(
    app: &App,
    host: &str,
    upstream_name: &str,
    reference: &str,
    accept: Option<&HeaderValue>,
) -> Result<(Bytes, String, Digest), SpecError> {
    let path = format!("{upstream_name}/manifests/{reference}");
    let response =
        app.registries.send(host, upstream_name, Method::GET, &path, accept).await.map_err(upstream)?;
    match response.status() {
        s if s.is_success() => {}
        StatusCode::NOT_FOUND => return Err(SpecError::manifest_unknown()),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(SpecError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "upstream refused access"));
        }
        s => return Err(SpecError::upstream(format!("upstream answered {s}"))),
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
        .map_err(|e| SpecError::upstream(e.to_string()))?
        .ok_or_else(|| SpecError::new(StatusCode::BAD_GATEWAY, "MANIFEST_INVALID", "manifest too large"))?;
    app.metrics.upstream_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    // Address by the upstream's announced algorithm if it is sha512, else sha256.
    let algorithm = match announced.as_deref() {
        Some(d) if d.starts_with("sha512:") => DigestAlgorithm::Sha512,
        _ => DigestAlgorithm::Sha256,
    };
    let digest = Digest::from(ContentDigest::of(algorithm, &bytes));
    if let Some(announced) = announced
        && announced != digest.to_string()
    {
        return Err(SpecError::upstream(format!(
            "upstream announced {announced} for a manifest hashing to {digest}"
        )));
    }
    let expected = Expected::new().with_size(bytes.len() as u64).with_digest(digest.content_digest().clone());
    tolerate_database(
        app.manifests.store(&digest.to_string(), &bytes[..], &expected, &media_type).await,
        "manifest",
    )?;
    Ok((bytes, media_type, digest))
}

fn manifest_response(
    method: &Method,
    bytes: Bytes,
    media_type: &str,
    digest: &Digest,
    outcome: CacheOutcome,
) -> Response {
    let len = bytes.len() as u64;
    let mut response =
        if *method == Method::HEAD { Response::new(Body::empty()) } else { Response::new(Body::from(bytes)) };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header_value(media_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    set_digest(headers, digest);
    response.extensions_mut().insert(outcome);
    response
}

fn set_digest(headers: &mut HeaderMap, digest: &Digest) {
    headers.insert("docker-content-digest", header_value(&digest.to_string()));
}

fn copy_header(from: &HeaderMap, to: &mut HeaderMap, name: header::HeaderName) {
    if let Some(value) = from.get(&name).and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
        to.insert(name, value);
    }
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn internal(error: dunite_oci::Error) -> SpecError {
    let message = crate::error_chain(&error);
    // A busy pool is no outage and no fault of ours to log as one (the cache no longer
    // answers it with a full-file read from disk): the client is asked to come back.
    if error.as_cache().is_some_and(dunite_core::Error::is_pool_timeout) {
        tracing::warn!(error = %message, "metadata database busy; answered 503");
        return SpecError::new(StatusCode::SERVICE_UNAVAILABLE, "UNKNOWN", message);
    }
    tracing::error!(error = %message, "blob cache error");
    SpecError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", message)
}

fn core_internal(error: dunite_core::Error) -> SpecError {
    internal(dunite_oci::Error::Cache(error))
}

fn upstream(error: crate::upstream::UpstreamError) -> SpecError {
    SpecError::upstream(crate::error_chain(&error))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A busy pool reaches a client as a 503 to retry, not a 500: since `BlobCache::open` no
    /// longer takes it for an outage (issue 16), it would otherwise fail hits outright.
    #[test]
    fn a_busy_pool_is_a_503_and_an_outage_is_not() {
        let busy = dunite_core::Error::Database {
            op: "acquire a connection",
            source: Arc::new(sqlx::Error::PoolTimedOut),
        };
        assert_eq!(core_internal(busy).status, StatusCode::SERVICE_UNAVAILABLE);
        let refused = dunite_core::Error::Database {
            op: "look up an entry",
            source: Arc::new(sqlx::Error::RowNotFound),
        };
        assert_eq!(core_internal(refused).status, StatusCode::INTERNAL_SERVER_ERROR);
    }

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

    #[test]
    fn tag_keys_vary_by_the_accepted_manifest_types_only() {
        let keys =
            |accept: &'static str| TagKeys::new("r.example", "a/b", "v1", &HeaderValue::from_static(accept));
        let key = |accept: &'static str| keys(accept).variant;
        let oci = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";
        assert_eq!(
            key(oci),
            key(
                "Application/VND.oci.image.manifest.v1+json;q=0.9 ,application/vnd.oci.image.index.v1+json, x/y"
            )
        );
        assert_eq!(
            key(oci),
            key(
                "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, text/html"
            )
        );
        assert_ne!(key(oci), key("application/vnd.oci.image.manifest.v1+json"));
        assert_eq!(
            key("application/vnd.oci.image.manifest.v1+json"),
            key("application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json;q=0")
        );
        assert!(key(oci).starts_with("r.example/a/b:v1@"));
        assert_eq!(keys(oci).last, "r.example/a/b:v1");
        let index = "application/vnd.oci.image.index.v1+json";
        let single = "application/vnd.docker.distribution.manifest.v2+json";
        assert!(keys(oci).may_serve(index));
        assert!(!keys(oci).may_serve(single), "not accepted");
        assert!(
            !keys("*/*, application/vnd.oci.image.index.v1+json").may_serve(single),
            "the wrong platform"
        );
        assert!(keys("*/*").may_serve(single));
        assert!(!keys("application/vnd.oci.image.index.v1+json;Q=0, */*").may_serve(index), "refused");
        assert_eq!(keys("x/y").upstream_accept(), None);
        assert_eq!(keys(oci).upstream_accept().unwrap(), oci);
        assert_eq!(
            keys("application/vnd.oci.image.index.v1+json;q=0.0, application/vnd.oci.image.manifest.v1+json")
                .accepted,
            ["application/vnd.oci.image.manifest.v1+json"]
        );
        let two = TagKeys::new("r.example", "a/b", "v2", &HeaderValue::from_static(oci)).variant;
        assert_ne!(key(oci), two);
    }

    #[test]
    fn repeated_accept_headers_are_joined() {
        let mut headers = HeaderMap::new();
        headers
            .append(header::ACCEPT, HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"));
        headers.append(header::ACCEPT, HeaderValue::from_static("application/vnd.oci.image.index.v1+json"));
        assert_eq!(
            accept_header(&headers),
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
        );
        assert_eq!(accept_header(&HeaderMap::new()), DEFAULT_ACCEPT);
    }

    #[test]
    fn an_index_without_a_media_type_is_served_as_an_index() {
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(declared_media_type(index), "application/vnd.oci.image.index.v1+json");
        let manifest = br#"{"schemaVersion":2,"layers":[]}"#;
        assert_eq!(declared_media_type(manifest), "application/vnd.oci.image.manifest.v1+json");
    }
}
