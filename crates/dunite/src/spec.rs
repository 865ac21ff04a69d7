//! The OCI distribution spec's grammar and error bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use dunite_oci::Digest;

/// Longest repository name accepted (clients cap name plus host at 255 characters).
const MAX_NAME: usize = 255;

/// A repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` components joined by `/`.
#[must_use]
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && name.split('/').all(is_valid_component)
}

fn is_valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator: `.`, `_`, `__` or one or more `-`, between alphanumerics.
        let start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= bytes.len() || !alnum(bytes[i]) {
            return false;
        }
    }
    true
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[must_use]
pub fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A tag, revalidated after the tag TTL.
    Tag(String),
    /// A digest, immutable.
    Digest(Digest),
}

impl Reference {
    /// Parse a reference, strictly.
    ///
    /// # Errors
    ///
    /// [`ReferenceError`]: neither a digest nor a tag.
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        if text.contains(':') {
            Ok(Self::Digest(text.parse()?))
        } else if is_valid_tag(text) {
            Ok(Self::Tag(text.to_owned()))
        } else {
            Err(ReferenceError::Tag)
        }
    }
}

/// Why a manifest reference is neither a digest nor a tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReferenceError {
    /// It has a `:`, so it is meant as a digest, and is not one.
    #[error("invalid digest: {0}")]
    Digest(#[from] dunite_oci::DigestError),
    /// It is outside the tag grammar.
    #[error("invalid tag")]
    Tag,
}

impl ReferenceError {
    /// The spec's error code: `DIGEST_INVALID` or `MANIFEST_INVALID` (answered with a 400).
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::Digest(_) => "DIGEST_INVALID",
            Self::Tag => "MANIFEST_INVALID",
        }
    }
}

/// An error answered with the spec's JSON body: `{"errors":[{"code","message","detail"}]}`.
/// The wire format only: which failure gets which status and code is decided in one place,
/// the mirror's error type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The spec's error code (`BLOB_UNKNOWN`, `NAME_INVALID`, ...).
    pub code: &'static str,
    /// A human message.
    pub message: String,
}

impl SpecError {
    /// An error with this status, code and message.
    #[must_use]
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl IntoResponse for SpecError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "errors": [{ "code": self.code, "message": self.message, "detail": null }]
        });
        (self.status, [("content-type", "application/json")], body.to_string()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["library/alpine", "a", "a/b/c", "my-repo", "my--repo", "a.b", "a_b", "a__b", "x9/y8"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "A", "a/", "/a", "a//b", "-a", "a-", "a___b", "a..b", "a/../b", "..", "a%2fb", "a b"]
        {
            assert!(!is_valid_name(bad), "{bad}");
        }
        assert!(!is_valid_name(&"a".repeat(256)));
    }

    #[test]
    fn tags_and_references() {
        assert!(is_valid_tag("latest") && is_valid_tag("_x") && is_valid_tag("1.2.3-rc_1"));
        assert!(
            !is_valid_tag("")
                && !is_valid_tag(".x")
                && !is_valid_tag("-x")
                && !is_valid_tag(&"a".repeat(129))
        );
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        assert_eq!(Reference::parse("sha256:zz").unwrap_err().code(), "DIGEST_INVALID");
        assert_eq!(Reference::parse("../x").unwrap_err().code(), "MANIFEST_INVALID");
    }
}
