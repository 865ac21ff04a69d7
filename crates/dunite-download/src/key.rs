//! `UrlKey`: the canonical form of a URL, the cache key of a download.

use std::fmt;
use std::str::FromStr;

/// A canonical `http` or `https` URL: the key a download is cached under.
///
/// Canonicalisation (by the `url` crate, WHATWG rules, plus dropping the fragment): the scheme
/// and host are lower-cased (non-ASCII hosts become punycode), a default port (80 for `http`,
/// 443 for `https`) is dropped, an empty path becomes `/`, dot segments are resolved, and the
/// fragment (never sent to a server) is removed. The query is kept as given: two URLs that
/// differ only in query order are different keys.
///
/// # Example
///
/// ```
/// use dunite_download::UrlKey;
///
/// let key: UrlKey = "HTTPS://Example.COM:443/a/./b#section".parse()?;
/// assert_eq!(key.as_str(), "https://example.com/a/b");
/// assert!("ftp://example.com/file".parse::<UrlKey>().is_err());
/// # Ok::<(), dunite_download::UrlError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UrlKey {
    canonical: String,
}

/// Why a string is not a usable download URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// The string is not a URL.
    #[error("invalid URL {input:?}: {reason}")]
    Parse {
        /// The string given.
        input: String,
        /// The parser's explanation.
        reason: String,
    },
    /// The URL's scheme is not `http` or `https`.
    #[error("unsupported URL scheme {scheme:?} (only http and https are cached)")]
    UnsupportedScheme {
        /// The scheme found.
        scheme: String,
    },
}

impl UrlKey {
    /// Parse and canonicalise `input`.
    ///
    /// # Errors
    ///
    /// [`UrlError::Parse`] if `input` is not a URL, [`UrlError::UnsupportedScheme`] if it is
    /// not `http` or `https`.
    pub fn parse(input: &str) -> Result<Self, UrlError> {
        let mut url = url::Url::parse(input)
            .map_err(|e| UrlError::Parse { input: input.to_owned(), reason: e.to_string() })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(UrlError::UnsupportedScheme { scheme: url.scheme().to_owned() });
        }
        url.set_fragment(None);
        Ok(Self { canonical: url.into() })
    }

    /// The canonical URL: the cache key.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    /// The URL for messages and logs: a query (which may carry a token or a signature)
    /// replaced by `?REDACTED`, and user name and password dropped. Errors of this crate
    /// show URLs this way.
    ///
    /// ```
    /// use dunite_download::UrlKey;
    ///
    /// let key = UrlKey::parse("https://u:pw@example.com/f.tgz?X-Amz-Signature=abc")?;
    /// assert_eq!(key.redacted(), "https://example.com/f.tgz?REDACTED");
    /// # Ok::<(), dunite_download::UrlError>(())
    /// ```
    #[must_use]
    pub fn redacted(&self) -> String {
        let Ok(mut url) = url::Url::parse(&self.canonical) else { return self.canonical.clone() };
        if url.query().is_some() {
            url.set_query(Some("REDACTED"));
        }
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.into()
    }
}

impl FromStr for UrlKey {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        Self::parse(s)
    }
}

impl fmt::Display for UrlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

impl AsRef<str> for UrlKey {
    fn as_ref(&self) -> &str {
        &self.canonical
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(input: &str) -> String {
        UrlKey::parse(input).map(|k| k.to_string()).unwrap_or_else(|e| format!("error: {e}"))
    }

    #[test]
    fn scheme_and_host_are_lower_cased_and_the_path_is_not() {
        assert_eq!(canonical("HTTP://EXAMPLE.com/Some/Path"), "http://example.com/Some/Path");
        assert_eq!(canonical("hTTpS://Example.Com"), "https://example.com/");
    }

    #[test]
    fn default_ports_are_dropped_and_others_kept() {
        assert_eq!(canonical("http://example.com:80/a"), "http://example.com/a");
        assert_eq!(canonical("https://example.com:443/a"), "https://example.com/a");
        assert_eq!(canonical("http://example.com:443/a"), "http://example.com:443/a");
        assert_eq!(canonical("https://example.com:80/a"), "https://example.com:80/a");
        assert_eq!(canonical("https://example.com:8443/a"), "https://example.com:8443/a");
    }

    #[test]
    fn fragments_are_dropped_and_queries_kept() {
        assert_eq!(canonical("https://example.com/a?x=1#frag"), "https://example.com/a?x=1");
        assert_eq!(canonical("https://example.com/a#"), "https://example.com/a");
        assert_eq!(
            UrlKey::parse("https://example.com/a#one").ok(),
            UrlKey::parse("https://EXAMPLE.com:443/a#two").ok()
        );
    }

    #[test]
    fn non_http_schemes_are_rejected() {
        for input in ["ftp://example.com/f", "file:///etc/passwd", "data:text/plain,hi", "mailto:a@b.c"] {
            let err = UrlKey::parse(input).unwrap_err();
            assert!(matches!(err, UrlError::UnsupportedScheme { .. }), "{input}: {err}");
        }
    }

    #[test]
    fn malformed_urls_are_typed_errors() {
        for input in ["", "example.com/no-scheme", "http://", "https://exa mple.com/", "http://[::1/"] {
            let err = UrlKey::parse(input).unwrap_err();
            assert!(matches!(err, UrlError::Parse { .. }), "{input}: {err}");
            assert!(err.to_string().contains("invalid URL"));
        }
    }
}
