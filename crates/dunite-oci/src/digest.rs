//! OCI digests, parsed strictly.

use std::fmt;
use std::str::FromStr;

use dunite_core::{ContentDigest, DigestAlgorithm};

/// An OCI content digest, `algorithm:encoded`: `sha256:` with 64 or `sha512:` with 128
/// lower-case hex characters. Nothing else parses, so a `Digest` is safe to log and to key a
/// cache with, and is never a path.
///
/// # Example
///
/// ```
/// use dunite_oci::Digest;
///
/// let d: Digest = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".parse()?;
/// assert_eq!(d.algorithm_name(), "sha256");
/// assert!("sha256:../../etc/passwd".parse::<Digest>().is_err());
/// # Ok::<(), dunite_oci::DigestError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    content: ContentDigest,
}

/// Why a string is not an OCI digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// No `:` between algorithm and encoded part.
    #[error("missing `:` between algorithm and hex")]
    MissingSeparator,
    /// An algorithm other than `sha256` or `sha512`.
    #[error("unsupported digest algorithm (expected sha256 or sha512)")]
    UnsupportedAlgorithm,
    /// The encoded part has the wrong length for the algorithm.
    #[error("{algorithm} digests have {expected} hex characters, got {actual}")]
    WrongLength {
        /// The algorithm named.
        algorithm: &'static str,
        /// The length it requires.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// The encoded part has a character other than `0-9a-f`.
    #[error("digest hex must be lower-case 0-9a-f")]
    NotLowerHex,
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, DigestError> {
        let (algorithm, encoded) = s.split_once(':').ok_or(DigestError::MissingSeparator)?;
        let algorithm = match algorithm {
            "sha256" => DigestAlgorithm::Sha256,
            "sha512" => DigestAlgorithm::Sha512,
            _ => return Err(DigestError::UnsupportedAlgorithm),
        };
        let expected = algorithm.digest_len() * 2;
        if encoded.len() != expected {
            return Err(DigestError::WrongLength {
                algorithm: algorithm.name(),
                expected,
                actual: encoded.len(),
            });
        }
        if !encoded.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(DigestError::NotLowerHex);
        }
        let bytes = hex::decode(encoded).map_err(|_| DigestError::NotLowerHex)?;
        let content = ContentDigest::from_bytes(algorithm, bytes).ok_or(DigestError::NotLowerHex)?;
        Ok(Self { content })
    }
}

impl Digest {
    /// The SHA-256 digest of `data`.
    #[must_use]
    pub fn sha256_of(data: &[u8]) -> Self {
        Self { content: ContentDigest::of(DigestAlgorithm::Sha256, data) }
    }

    /// The algorithm's name, `sha256` or `sha512`.
    #[must_use]
    pub fn algorithm_name(&self) -> &'static str {
        self.content.algorithm().name()
    }

    /// The algorithm and raw bytes, as the core verifies them.
    #[must_use]
    pub fn content_digest(&self) -> &ContentDigest {
        &self.content
    }
}

impl From<ContentDigest> for Digest {
    fn from(content: ContentDigest) -> Self {
        Self { content }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.content, f)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.content, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn round_trips() {
        let d: Digest = ABC.parse().unwrap();
        assert_eq!(d.to_string(), ABC);
        assert_eq!(d, Digest::sha256_of(b"abc"));
        let long = format!("sha512:{}", "0".repeat(128));
        assert_eq!(long.parse::<Digest>().unwrap().to_string(), long);
    }

    #[test]
    fn rejects_everything_else() {
        let cases: &[(&str, DigestError)] = &[
            ("", DigestError::MissingSeparator),
            ("sha256", DigestError::MissingSeparator),
            ("md5:d41d8cd98f00b204e9800998ecf8427e", DigestError::UnsupportedAlgorithm),
            (
                "SHA256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                DigestError::UnsupportedAlgorithm,
            ),
            ("sha256:abc", DigestError::WrongLength { algorithm: "sha256", expected: 64, actual: 3 }),
            (
                "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
                DigestError::NotLowerHex,
            ),
            (
                "sha256:../../../../../../../../../../../../../../../../../etc/passwd",
                DigestError::WrongLength { algorithm: "sha256", expected: 64, actual: 61 },
            ),
            (
                "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f2001/..",
                DigestError::NotLowerHex,
            ),
            (
                " sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                DigestError::UnsupportedAlgorithm,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Digest>().as_ref(), Err(want), "{input:?}");
        }
    }
}
