//! Content digests: the algorithms dunite verifies payloads with.

use std::fmt;

use sha2::Digest as _;

/// A digest algorithm a cache verifies content with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DigestAlgorithm {
    /// SHA-256 (32 bytes).
    Sha256,
    /// SHA-512 (64 bytes).
    Sha512,
}

impl DigestAlgorithm {
    /// The algorithm's name as OCI digests spell it (`sha256`, `sha512`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    /// Length of the digest in bytes.
    #[must_use]
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    pub(crate) fn hasher(self) -> Hasher {
        match self {
            Self::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Self::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
}

/// A computed or expected digest: an algorithm and its bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ContentDigest {
    algorithm: DigestAlgorithm,
    bytes: Vec<u8>,
}

impl ContentDigest {
    /// A digest from its raw bytes; `None` if the length does not fit the algorithm.
    #[must_use]
    pub fn from_bytes(algorithm: DigestAlgorithm, bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() == algorithm.digest_len()).then_some(Self { algorithm, bytes })
    }

    /// The digest of `data`, computed in one go.
    #[must_use]
    pub fn of(algorithm: DigestAlgorithm, data: &[u8]) -> Self {
        let mut hasher = algorithm.hasher();
        hasher.update(data);
        hasher.finish()
    }

    /// The algorithm.
    #[must_use]
    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    /// The raw digest bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Lower-case hex of the digest bytes.
    #[must_use]
    pub fn hex(&self) -> String {
        hex::encode(&self.bytes)
    }
}

/// `algorithm:hex`, as OCI spells digests.
impl fmt::Display for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex())
    }
}

impl fmt::Debug for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Clone)]
pub(crate) enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub(crate) fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
        }
    }

    pub(crate) fn finish(self) -> ContentDigest {
        let (algorithm, bytes) = match self {
            Self::Sha256(h) => (DigestAlgorithm::Sha256, h.finalize().to_vec()),
            Self::Sha512(h) => (DigestAlgorithm::Sha512, h.finalize().to_vec()),
        };
        ContentDigest { algorithm, bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        assert_eq!(
            ContentDigest::of(DigestAlgorithm::Sha256, b"abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(ContentDigest::of(DigestAlgorithm::Sha512, b"abc").hex().starts_with("ddaf35a193617aba"));
        assert!(ContentDigest::from_bytes(DigestAlgorithm::Sha256, vec![0; 31]).is_none());
    }
}
