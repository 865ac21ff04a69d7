//! Property checks for every parser that reads untrusted input, for fuzzers.
//!
//! Each function takes arbitrary bytes, feeds them to one parser the server uses on what a
//! client or an upstream sends, and panics when the parser panics or breaks one of its
//! properties (an accepted name that could be a path, a range outside the blob, ...). The same
//! checks are driven two ways: by proptest in `tests/it/hostile.rs` (part of `cargo xtask ci`)
//! and by libFuzzer through the cargo-fuzz targets in `fuzz/` (`cargo xtask fuzz`, which needs
//! a nightly toolchain). So a property is written once, here.
//!
//! Enabled by the `fuzzing` feature. Not a stable API: it exists for the fuzz targets and the
//! tests.
//!
//! ```
//! dunite::fuzzing::digest(b"sha256:../../etc/passwd");
//! dunite::fuzzing::range(b"\0\0\0\0\0\0\0\x64bytes=-10");
//! ```

use axum::http::{HeaderMap, HeaderValue, header};

use dunite_download::UrlKey;
use dunite_oci::Digest;

use crate::spec::{Reference, is_valid_name, is_valid_tag};

/// The bytes as text, when they are UTF-8 (what every text parser here is given: axum decodes
/// paths to `String`s and refuses what is not UTF-8 before a handler runs).
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Whether `text` looks like a path traversal or an escape.
fn traversal_shaped(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.starts_with('/')
        || lower.contains("..")
        || lower.contains('%')
        || lower.contains('\\')
        || lower.contains('\0')
        || lower.contains("//")
}

/// The grammar of a repository name, written independently of [`is_valid_name`].
fn name_grammar(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    name.len() <= 255
        && name.split('/').all(|component| {
            let chars: Vec<char> = component.chars().collect();
            !chars.is_empty()
                && alnum(chars[0])
                && alnum(chars[chars.len() - 1])
                && chars.iter().all(|&c| alnum(c) || matches!(c, '.' | '_' | '-'))
                && !component.contains("..")
                && !component.contains("___")
                && !component.contains("._")
                && !component.contains("_.")
                && !component.contains(".-")
                && !component.contains("-.")
                && !component.contains("_-")
                && !component.contains("-_")
        })
}

/// Repository names: an accepted name satisfies the grammar and is never path-shaped (no
/// `..`, `%`, `\`, NUL, `//` or leading `/`).
pub fn name(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if is_valid_name(text) {
        assert!(name_grammar(text), "accepted name {text:?} is outside the grammar");
        assert!(!traversal_shaped(text), "accepted name {text:?} is path-shaped");
    }
}

/// Tags and manifest references: an accepted tag is one segment (no `/`, `%`, `\`, NUL; at
/// most 128 characters; no leading `.` or `-`), and `Reference::parse` gives back the tag
/// unchanged or a digest that prints as the input, or refuses it (a 400 at the server).
pub fn reference(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let tag = is_valid_tag(text);
    if tag {
        // `..` may occur inside a tag (`a..b` is grammatical); a tag is never a dot segment.
        let escapes = ['/', '%', '\\', '\0'].iter().any(|&c| text.contains(c));
        assert!(!escapes && text.len() <= 128, "accepted tag {text:?}");
        assert!(!text.starts_with('.') && !text.starts_with('-'), "accepted tag {text:?}");
    }
    match Reference::parse(text) {
        Ok(Reference::Tag(t)) => assert!(tag && t == text, "tag {text:?} became {t:?}"),
        Ok(Reference::Digest(d)) => assert_eq!(d.to_string(), text),
        Err(e) => assert!(!tag, "{text:?}: {e:?}"),
    }
}

/// Digests: an accepted digest is exactly `sha256:` and 64, or `sha512:` and 128, lower-case
/// hex digits, and prints as the input.
pub fn digest(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Ok(digest) = text.parse::<Digest>() {
        assert_eq!(digest.to_string(), text);
        let (algorithm, hex) = text.split_once(':').expect("an accepted digest has a colon");
        let want = match algorithm {
            "sha256" => 64,
            "sha512" => 128,
            other => panic!("accepted algorithm {other:?}"),
        };
        assert_eq!(hex.len(), want, "{text:?}");
        assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{text:?}");
    }
}

/// A URL's path, between the authority and the query.
fn url_path(canonical: &str) -> &str {
    let after_scheme = canonical.split_once("://").map_or(canonical, |(_, rest)| rest);
    let path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
    path.split(['?', '#']).next().unwrap_or("")
}

/// Download URL keys: an accepted key is `http(s)://`, has no fragment, re-parses to itself,
/// and has no dot segment in any spelling (`.`, `..`, `%2e`, `%2E.`, ...).
pub fn url_key(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let Ok(key) = UrlKey::parse(input) else { return };
    let canonical = key.as_str();
    assert!(
        canonical.starts_with("http://") || canonical.starts_with("https://"),
        "{input:?} -> {canonical:?}"
    );
    assert!(!canonical.contains('#'), "{input:?} -> {canonical:?}");
    let again = UrlKey::parse(canonical).map(|k| k.as_str().to_owned());
    assert_eq!(again.as_deref(), Ok(canonical), "not idempotent for {input:?}");
    for segment in url_path(canonical).split('/') {
        let lower = segment.to_ascii_lowercase().replace("%2e", ".");
        assert!(lower != "." && lower != "..", "dot segment in {canonical:?} from {input:?}");
    }
}

/// The download proxy's request (`/dl/<rest>?<query>`; the bytes are split at the first `?`):
/// what it accepts is a URL key with a host, no credentials, and the URL the allowlist is
/// checked against is the key's; a pin is 32 bytes. What it refuses, it refuses
/// with a message.
pub fn download_target(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let (rest, query) = match input.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (input, None),
    };
    match crate::dl::Target::parse(rest, query) {
        Ok(target) => {
            url_key(target.url.as_str().as_bytes());
            let url = url::Url::parse(target.url.as_str()).expect("a key is a URL");
            assert_eq!(url, target.address, "the allowlist checks another URL than the key: {input:?}");
            assert!(url.username().is_empty() && url.password().is_none(), "credentials kept: {input:?}");
            if let Some(pin) = &target.pin {
                assert_eq!(pin.as_bytes().len(), 32, "{input:?}");
            }
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
}

/// The client's `Range` header (the first 8 bytes are the blob's size, big-endian; the rest
/// the header): a range served lies within the blob, first byte not after last.
pub fn range(data: &[u8]) {
    let Some((size, value)) = data.split_first_chunk::<8>() else { return };
    let size = u64::from_be_bytes(*size);
    let Ok(value) = HeaderValue::from_bytes(value) else { return };
    if let Some((start, end)) = crate::oci::parse_range(&value, size) {
        assert!(start <= end && end < size, "{value:?} of {size} gave {start}-{end}");
    }
}

/// A manifest's declared media type (read on the database-outage path): any bytes give a
/// media type that is a non-empty header value, and such a declared `mediaType` is taken as is.
pub fn manifest_media_type(data: &[u8]) {
    let media_type = dunite_oci::declared_media_type(data);
    assert!(
        !media_type.is_empty() && HeaderValue::from_str(&media_type).is_ok(),
        "{media_type:?} is not a header value"
    );
    let declared = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("mediaType").and_then(|m| m.as_str().map(str::to_owned)));
    if let Some(declared) = declared.filter(|d| dunite_oci::is_header_text(d)) {
        assert!(HeaderValue::from_str(&declared).is_ok(), "{declared:?} taken for a header value");
        assert_eq!(media_type, declared);
    }
}

/// A client's `Accept`, as the tag cache reads it: the record's key is the tag's plus `@` and
/// 16 hex digits, the accepted types are manifest types (or `*/*`), sorted and distinct, and
/// asking the upstream with them (`upstream_accept`) keys the same record: what the upstream
/// answers suits the clients sharing it. The tag's last answer is never served as an index
/// to a client that refused indexes.
pub fn tag_keys(data: &[u8]) {
    use crate::oci::{accepted_types, upstream_accept};
    use dunite_oci::{MANIFEST_TYPES, TagKey};
    let Ok(accept) = HeaderValue::from_bytes(data) else { return };
    let key = TagKey::new("r.example", "a/b", "t", accepted_types(&accept));
    let suffix =
        key.variant().strip_prefix(&format!("{}@", key.last())).expect("the variant extends the tag's key");
    assert!(suffix.len() == 16 && suffix.bytes().all(|b| b.is_ascii_hexdigit()), "{:?}", key.variant());
    let accepted: Vec<&str> = key.types().accepted().collect();
    assert!(accepted.windows(2).all(|w| w[0] < w[1]), "{accepted:?}");
    assert!(accepted.iter().all(|t| MANIFEST_TYPES.contains(t)), "{accepted:?}");
    let asked = upstream_accept(key.types()).unwrap_or(HeaderValue::from_static(""));
    let again = TagKey::new("r.example", "a/b", "t", accepted_types(&asked));
    assert_eq!(again.variant(), key.variant(), "asking upstream keys another record: {accept:?}");
    let index = "application/vnd.oci.image.index.v1+json";
    if !accepted.iter().any(|t| *t == index || *t == "*/*") {
        assert!(!key.types().may_serve(index), "an index for {accept:?}");
    }
}

/// An upstream's `WWW-Authenticate` challenge: never a panic; every parameter name is
/// non-empty, trimmed and lower case.
pub fn bearer_challenge(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else { return };
    let mut headers = HeaderMap::new();
    headers.insert(header::WWW_AUTHENTICATE, value);
    if let Some(params) = crate::upstream::bearer_challenge(&headers) {
        for key in params.keys() {
            assert!(!key.is_empty() && key.trim() == key, "parameter name {key:?}");
            assert_eq!(key.to_ascii_lowercase(), *key);
        }
    }
}

/// An upstream's `Link` header, as the mirror pages through a tag list: the next page is read
/// only from a `rel="next"` link to the listing's own path, and the link written back to the
/// client is one link on the mirror's path (the query encoded, so it cannot close the `<..>`
/// or add a link or a header), with `ns` exactly once, the client's.
pub fn next_link(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else { return };
    let Some(query) = crate::oci::next_query(&value, "/v2/a/tags/list") else { return };
    assert!(!query.is_empty());
    let written = crate::oci::link("a", "tags/list", &query, Some("r.example"));
    let text = written.to_str().unwrap_or_else(|_| panic!("link {written:?} is not text"));
    let inner = text
        .strip_prefix("</v2/a/tags/list?")
        .and_then(|rest| rest.strip_suffix(">; rel=\"next\""))
        .unwrap_or_else(|| panic!("link {text:?} is not on the mirror's path"));
    assert!(!inner.contains(['<', '>', ',', ';', '"', ' ', '\r', '\n']), "link {text:?} escapes its query");
    let ns: Vec<_> = url::form_urlencoded::parse(inner.as_bytes()).filter(|(k, _)| k == "ns").collect();
    assert_eq!(ns.len(), 1, "link {text:?}");
    assert_eq!(ns[0].1, "r.example");
}

/// A property check: panics when its parser breaks a property on `data`.
pub type Check = fn(data: &[u8]);

/// Each check by name: the fuzz targets (`fuzz/fuzz_targets/<name>.rs`) and the seed
/// directories (`fuzz/seeds/<name>/`) are named after them.
pub const CHECKS: &[(&str, Check)] = &[
    ("name", name),
    ("reference", reference),
    ("digest", digest),
    ("url_key", url_key),
    ("download_target", download_target),
    ("range", range),
    ("manifest_media_type", manifest_media_type),
    ("bearer_challenge", bearer_challenge),
    ("tag_keys", tag_keys),
    ("next_link", next_link),
];
