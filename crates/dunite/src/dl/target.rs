//! What `GET /dl/<rest>?<query>` asks for, read from the request as sent.

use dunite_core::{ContentDigest, DigestAlgorithm};
use dunite_download::UrlKey;

/// What `GET /dl/<rest>?<query>` asks for: a URL (with the query), the same parsed as the
/// allowlist sees it, and an optional sha256 pin.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) url: UrlKey,
    /// `url` parsed: what the allowlist checks (host and port) is what the fetch connects to
    /// (the same parser reads both). It has a host and no credentials.
    pub(crate) address: url::Url,
    pub(crate) pin: Option<ContentDigest>,
}

impl Target {
    /// Parse the path after `/dl/` and the query, both as sent (not percent-decoded).
    ///
    /// # Errors
    ///
    /// [`TargetError`], whose message is what the client is told (with a 400).
    pub(crate) fn parse(rest: &str, query: Option<&str>) -> Result<Self, TargetError> {
        let (pin, target) = match rest.strip_prefix("sha256:").and_then(|r| r.split_once('/')) {
            Some((hex, url)) => {
                let digest =
                    hex::decode(hex).ok().and_then(|b| ContentDigest::from_bytes(DigestAlgorithm::Sha256, b));
                let Some(digest) = digest else {
                    return Err(TargetError::Pin);
                };
                (Some(digest), url)
            }
            None => (None, rest),
        };
        let target = match query {
            Some(q) => format!("{target}?{q}"),
            None => target.to_owned(),
        };
        let url = UrlKey::parse(&target)?;
        let parsed = url::Url::parse(url.as_str()).map_err(TargetError::Reparse)?;
        // Credentials in the URL would be stored in the cache key, shown in logs, and the
        // entry they unlocked served to every client: refused.
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(TargetError::Credentials);
        }
        if parsed.host().is_none() {
            return Err(TargetError::NoHost);
        }
        Ok(Self { url, address: parsed, pin })
    }
}

/// Why a `/dl/` request names no download.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum TargetError {
    /// A `sha256:` pin that is not 64 hex characters.
    #[error("the sha256 pin must be 64 hex characters")]
    Pin,
    /// Not an `http(s)` URL a download can be keyed by.
    #[error("not a download URL: {0}")]
    Url(#[from] dunite_download::UrlError),
    /// A key that does not parse back as a URL.
    #[error("not a download URL: {0}")]
    Reparse(#[source] url::ParseError),
    /// Credentials in the URL: they would be kept in the key, logged, and the entry they
    /// unlocked served to everyone.
    #[error("credentials in a download URL are not accepted")]
    Credentials,
    /// A URL without a host.
    #[error("a download URL needs a host")]
    NoHost,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_carry_the_query_and_pin_and_refuse_credentials() {
        let hex = "ab".repeat(32);
        let target =
            Target::parse(&format!("sha256:{hex}/https://Files.Example/a/../f"), Some("v=1")).unwrap();
        assert_eq!(target.url.as_str(), "https://files.example/f?v=1");
        assert_eq!(target.address.host_str(), Some("files.example"));
        assert_eq!(target.pin.map(|p| p.hex()), Some(hex));
        for refused in ["http://user:secret@h.example/f", "http://user@h.example/f", "http://:pw@h.example/f"]
        {
            let message = Target::parse(refused, None).unwrap_err().to_string();
            assert!(message.contains("credentials"), "{refused}: {message}");
            assert!(!message.contains("secret"), "the message repeats the password: {message}");
        }
        assert!(
            Target::parse("sha256:abc/https://h.example/f", None).unwrap_err().to_string().contains("pin")
        );
        assert!(Target::parse("file:///etc/passwd", None).is_err());
    }
}
