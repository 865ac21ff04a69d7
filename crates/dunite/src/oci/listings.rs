//! `GET /v2/<name>/tags/list` and `GET /v2/<name>/referrers/<digest>`: passed to the upstream
//! with the client's query (`n`, `last`, `artifactType`), kept in the tag cache
//! (`TagCache::record_listing`) and served from it for the tag TTL, and stale while the
//! upstream does not answer (for at most `--tag-max-stale`). The upstream's `Link` to the next
//! page is rewritten to the mirror's path; `OCI-Filters-Applied` is relayed.
//!
//! An upstream without the referrers API answers 404; so does the mirror, and the client falls
//! back to the `sha256-<hex>` tag schema, which it reads through the manifest route. An empty
//! index instead would tell it the registry supports referrers and has none, and it would
//! never look at the fallback tag.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;

use dunite_oci::{Digest, Listing, ListingKey, MAX_LISTING_BYTES};

use super::{Error, Mirror, Stale, header_value};
use crate::metrics::CacheOutcome;
use crate::peer::Peer;
use crate::upstream::UpstreamError;

/// The longest query passed to the upstream (and so in a listing's key).
pub(crate) const MAX_QUERY_BYTES: usize = 1024;

/// The media type of a referrers list.
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Which listing.
#[derive(Debug)]
pub(super) enum Kind {
    /// `tags/list`.
    Tags,
    /// `referrers/<digest>`.
    Referrers(Digest),
}

impl Kind {
    /// The path after `/v2/<name>/`.
    fn path(&self) -> String {
        match self {
            Self::Tags => "tags/list".to_owned(),
            Self::Referrers(digest) => format!("referrers/{digest}"),
        }
    }

    /// What the upstream's 404 means.
    fn not_found(&self) -> Error {
        match self {
            Self::Tags => Error::NameUnknown,
            Self::Referrers(_) => Error::ReferrersUnsupported,
        }
    }
}

/// The client's query as passed to the upstream: its parameters but `ns` (the mirror's own),
/// in order, encoded; `n` must be a number.
///
/// # Errors
///
/// [`Error::PaginationNumberInvalid`], [`Error::QueryTooLong`].
pub(super) fn upstream_query<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<String, Error> {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        if key == "ns" {
            continue;
        }
        if key == "n" && value.parse::<u32>().is_err() {
            return Err(Error::PaginationNumberInvalid(value.chars().take(32).collect()));
        }
        query.append_pair(key, value);
    }
    let query = query.finish();
    if query.len() > MAX_QUERY_BYTES {
        return Err(Error::QueryTooLong);
    }
    Ok(query)
}

/// Serve the listing `kind` of `name` on `host` asked with `query` ([`upstream_query`]); `ns`
/// is the client's `?ns=`, kept in the `Link` to the next page.
pub(super) async fn listing(
    mirror: &Arc<Mirror>,
    method: &Method,
    (host, name): (&str, &str),
    (kind, query): (Kind, &str),
    ns: Option<&str>,
    peer: Peer,
) -> Result<Response, Error> {
    let path = kind.path();
    let key = ListingKey::new(host, name, &path, query);
    let known = mirror.tags.listing(&key).await?;
    if let Some(fresh) = known.as_ref().filter(|known| known.is_fresh()) {
        return Ok(respond(method, fresh, (name, &path, ns), CacheOutcome::Hit));
    }
    match fetch(mirror, (host, name), (&kind, &path, query), peer).await {
        Ok(answer) => {
            if let Err(error) = mirror.tags.record_listing(&key, &answer).await {
                tracing::warn!(%error, listing = key.as_str(), "could not keep a listing; served all the same");
            }
            Ok(respond(method, &answer, (name, &path, ns), CacheOutcome::Miss))
        }
        Err(error) => {
            let Some(known) = known else { return Err(error) };
            let Some(reason) = mirror.may_stand_in(&error, known.age()) else { return Err(error) };
            mirror.served_stale(reason, Stale::Listing, key.as_str(), &error);
            Ok(respond(method, &known, (name, &path, ns), CacheOutcome::Stale))
        }
    }
}

/// Ask the upstream for the listing, under the fill limits.
async fn fetch(
    mirror: &Mirror,
    (host, name): (&str, &str),
    (kind, path, query): (&Kind, &str, &str),
    peer: Peer,
) -> Result<Listing, Error> {
    let _permit = mirror.limits.try_start(peer.ip())?;
    let upstream_name = mirror.registries.upstream_name(host, name);
    let separator = if query.is_empty() { "" } else { "?" };
    let accept = match kind {
        Kind::Tags => HeaderValue::from_static("application/json"),
        Kind::Referrers(_) => HeaderValue::from_static(INDEX),
    };
    let asked = format!("{upstream_name}/{path}{separator}{query}");
    let get = mirror.registries.send(host, &upstream_name, Method::GET, &asked, Some(&accept));
    let answer = mirror.metrics.upstream(get).await?;
    match answer.status() {
        status if status.is_success() => {}
        StatusCode::NOT_FOUND => return Err(kind.not_found()),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(Error::Unauthorized),
        status => return Err(Error::UpstreamStatus(status)),
    }
    let text = |name: &str| answer.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = text("content-type").unwrap_or_else(|| match kind {
        Kind::Tags => "application/json".to_owned(),
        Kind::Referrers(_) => INDEX.to_owned(),
    });
    let next = answer
        .headers()
        .get_all(header::LINK)
        .iter()
        .find_map(|link| next_query(link, &format!("/v2/{upstream_name}/{path}")));
    let filters_applied = text("oci-filters-applied");
    let body = crate::upstream::read_limited(answer, MAX_LISTING_BYTES)
        .await
        .map_err(UpstreamError::from)?
        .ok_or(Error::ListingTooLarge)?;
    mirror.metrics.upstream_bytes().add(body.len() as u64);
    Ok(Listing::new(body.to_vec(), content_type).with_next(next).with_filters_applied(filters_applied))
}

/// The query of the next page a `Link: <url>; rel="next"` names, if its URL is `path` (the
/// listing's own, on the upstream), re-encoded without `ns`. A link elsewhere is dropped: the
/// mirror can only page through what it serves.
pub(crate) fn next_query(link: &HeaderValue, path: &str) -> Option<String> {
    let base = url::Url::parse("http://upstream.invalid/").ok()?;
    link.to_str().ok()?.split(',').find_map(|one| {
        let (target, params) = one.trim().strip_prefix('<')?.split_once('>')?;
        let next = params.split(';').any(|param| {
            let param = param.trim().to_ascii_lowercase();
            param == "rel=\"next\"" || param == "rel=next"
        });
        let url = base.join(target).ok().filter(|_| next)?;
        if url.path() != path {
            tracing::debug!(link = target, "the upstream's next page is not this listing's; dropped");
            return None;
        }
        let pairs = url.query_pairs().filter(|(k, _)| k != "ns");
        let query = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
        (!query.is_empty()).then_some(query)
    })
}

/// The `Link` to the next page on the mirror: `</v2/<name>/<path>?<query>[&ns=..]>; rel="next"`.
pub(crate) fn link(name: &str, path: &str, query: &str, ns: Option<&str>) -> HeaderValue {
    let mut query = query.to_owned();
    if let Some(ns) = ns {
        query = url::form_urlencoded::Serializer::for_suffix(query, 0).append_pair("ns", ns).finish();
    }
    header_value(&format!("</v2/{name}/{path}?{query}>; rel=\"next\""))
}

fn respond(
    method: &Method,
    listing: &Listing,
    (name, path, ns): (&str, &str, Option<&str>),
    outcome: CacheOutcome,
) -> Response {
    let body = if *method == Method::HEAD { Body::empty() } else { Body::from(listing.body().to_vec()) };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header_value(listing.content_type()));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(listing.body().len()));
    if let Some(next) = listing.next() {
        headers.insert(header::LINK, link(name, path, next, ns));
    }
    if let Some(filters) = listing.filters_applied() {
        headers.insert("oci-filters-applied", header_value(filters));
    }
    response.extensions_mut().insert(outcome);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_passed_on_drops_ns_and_checks_n() {
        let query = upstream_query([("n", "10"), ("ns", "docker.io"), ("last", "v 1&x")]).unwrap();
        assert_eq!(query, "n=10&last=v+1%26x");
        assert_eq!(
            upstream_query([("artifactType", "application/vnd.dev.cosign+json")]).unwrap(),
            "artifactType=application%2Fvnd.dev.cosign%2Bjson"
        );
        assert!(matches!(upstream_query([("n", "ten")]), Err(Error::PaginationNumberInvalid(_))));
        let long = "x".repeat(MAX_QUERY_BYTES);
        assert!(matches!(upstream_query([("last", long.as_str())]), Err(Error::QueryTooLong)));
        assert_eq!(upstream_query([]).unwrap(), "");
    }

    #[test]
    fn the_next_page_is_read_from_the_upstreams_link_and_written_as_the_mirrors() {
        let path = "/v2/library/alpine/tags/list";
        let next = |value: &'static str| next_query(&HeaderValue::from_static(value), path);
        assert_eq!(
            next(r#"</v2/library/alpine/tags/list?n=2&last=b>; rel="next""#).as_deref(),
            Some("n=2&last=b")
        );
        assert_eq!(
            next(r#"<https://registry.example/v2/library/alpine/tags/list?last=b&n=2>; rel=next"#).as_deref(),
            Some("last=b&n=2"),
            "an absolute URL is read for its query"
        );
        assert_eq!(next(r#"</v2/library/alpine/tags/list?n=2&last=b>; rel="prev""#), None);
        assert_eq!(next(r#"</v2/other/tags/list?n=2&last=b>; rel="next""#), None, "another listing");
        assert_eq!(
            next(r#"</v2/x>; rel="prev", </v2/library/alpine/tags/list?n=1&last=a&ns=evil>; rel="next""#)
                .as_deref(),
            Some("n=1&last=a"),
        );
        assert_eq!(next("garbage"), None);

        assert_eq!(
            link("alpine", "tags/list", "n=2&last=b", None),
            r#"</v2/alpine/tags/list?n=2&last=b>; rel="next""#
        );
        assert_eq!(
            link("alpine", "tags/list", "n=2&last=b", Some("docker.io")),
            r#"</v2/alpine/tags/list?n=2&last=b&ns=docker.io>; rel="next""#
        );
    }
}
