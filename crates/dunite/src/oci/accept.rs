//! A client's `Accept`, read into the manifest types the tag cache keys on.

use axum::http::{HeaderMap, HeaderValue, header};

use dunite_oci::AcceptedTypes;

/// What clients accept when they do not say.
pub(super) const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// The client's `Accept`: every `Accept` header it sent, joined (some clients send one per
/// media type), or what clients accept when they do not say.
pub(super) fn accept_header(headers: &HeaderMap) -> HeaderValue {
    let values: Vec<&[u8]> = headers.get_all(header::ACCEPT).iter().map(HeaderValue::as_bytes).collect();
    if values.is_empty() {
        return HeaderValue::from_static(DEFAULT_ACCEPT);
    }
    HeaderValue::from_bytes(&values.join(&b", "[..]))
        .unwrap_or_else(|_| HeaderValue::from_static(DEFAULT_ACCEPT))
}

/// The manifest types `accept` names: an item with `q=0` refuses its type, any other accepts
/// it (registries ignore other `q` values, so the mirror does too).
pub(crate) fn accepted_types(accept: &HeaderValue) -> AcceptedTypes {
    let mut types = AcceptedTypes::new();
    for item in String::from_utf8_lossy(accept.as_bytes()).split(',') {
        let zero = item.split(';').skip(1).any(|param| {
            let param = param.trim().to_ascii_lowercase();
            param.strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
        });
        if zero {
            types.refuse(item);
        } else {
            types.accept(item);
        }
    }
    types
}

/// The `Accept` to send upstream: exactly the accepted types (so the answer suits every
/// client sharing the record), or none when there are none.
pub(crate) fn upstream_accept(types: &AcceptedTypes) -> Option<HeaderValue> {
    let accepted: Vec<&str> = types.accepted().collect();
    if accepted.is_empty() {
        return None;
    }
    HeaderValue::from_str(&accepted.join(", ")).ok()
}

#[cfg(test)]
mod tests {
    use dunite_oci::TagKey;

    use super::*;

    #[test]
    fn tag_keys_vary_by_the_accepted_manifest_types_only() {
        let types = |accept: &'static str| accepted_types(&HeaderValue::from_static(accept));
        let key =
            |accept: &'static str| TagKey::new("r.example", "a/b", "v1", types(accept)).variant().to_owned();
        let oci = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";
        assert_eq!(
            key(oci),
            key(
                "Application/VND.oci.image.manifest.v1+json;q=0.9 ,application/vnd.oci.image.index.v1+json, x/y"
            )
        );
        assert_ne!(key(oci), key("application/vnd.oci.image.manifest.v1+json"));
        assert_eq!(
            key("application/vnd.oci.image.manifest.v1+json"),
            key("application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json;q=0")
        );
        let index = "application/vnd.oci.image.index.v1+json";
        assert!(!types("application/vnd.oci.image.index.v1+json;Q=0, */*").may_serve(index), "refused");
        assert_eq!(upstream_accept(&types("x/y")), None);
        assert_eq!(upstream_accept(&types(oci)).unwrap(), oci);
        assert_eq!(
            types(
                "application/vnd.oci.image.index.v1+json;q=0.0, application/vnd.oci.image.manifest.v1+json"
            )
            .accepted()
            .collect::<Vec<_>>(),
            ["application/vnd.oci.image.manifest.v1+json"]
        );
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
}
