//! Generated payloads: deterministic pseudo-random streams that are never held in memory.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use dunite_core::{ContentDigest, DigestAlgorithm};
use dunite_download::{FetchError, FetchRequest, Fetched, Fetcher, ResponseMeta, fetch_fn};
use dunite_oci::Digest;
use sha2::Digest as _;
use tokio::io::{AsyncRead, ReadBuf};

/// The buffer size of every copy loop in the benchmarks (the cache's own store buffer).
pub const CHUNK: usize = 256 * 1024;

/// A stream of `len` pseudo-random bytes derived from `seed`. The byte at each position is
/// fixed whatever the read sizes, so two readers of the same seed see the same bytes.
#[derive(Debug, Clone)]
pub struct GenReader {
    seed: u64,
    pos: u64,
    len: u64,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl GenReader {
    /// `len` bytes from `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        Self { seed: splitmix(seed), pos: 0, len }
    }

    /// Fill `out` with the next bytes; returns how many (0 at the end).
    pub fn fill(&mut self, out: &mut [u8]) -> usize {
        let want = usize::try_from((self.len - self.pos).min(out.len() as u64)).unwrap_or(out.len());
        let mut i = 0;
        while i < want {
            let word = splitmix(self.seed ^ (self.pos / 8)).to_le_bytes();
            let offset = usize::try_from(self.pos % 8).unwrap_or(0);
            let n = (8 - offset).min(want - i);
            out[i..i + n].copy_from_slice(&word[offset..offset + n]);
            i += n;
            self.pos += n as u64;
        }
        want
    }

    /// The whole stream in memory (small payloads only).
    pub fn to_vec(seed: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        Self::new(seed, len as u64).fill(&mut bytes);
        bytes
    }

    /// The SHA-256 digest of the stream, computed by streaming it through a fixed buffer.
    pub fn digest(seed: u64, len: u64) -> Digest {
        let mut reader = Self::new(seed, len);
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0; CHUNK];
        loop {
            let n = reader.fill(&mut buf);
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        digest_of(hasher)
    }
}

/// The OCI digest a finished hasher holds.
pub fn digest_of(hasher: sha2::Sha256) -> Digest {
    let content = ContentDigest::from_bytes(DigestAlgorithm::Sha256, hasher.finalize().to_vec())
        .expect("a SHA-256 digest has 32 bytes");
    Digest::from(content)
}

impl AsyncRead for GenReader {
    fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this.fill(buf.initialize_unfilled());
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Shared bytes, readable through a `Cursor` without copying.
#[derive(Debug, Clone)]
pub struct SharedBytes(pub Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A stand-in upstream for the download cache: answers each known URL with its bytes and
/// their `Content-Length`, at memory speed (no network is part of what is measured).
pub fn upstream(bodies: HashMap<String, Arc<Vec<u8>>>) -> Arc<dyn Fetcher> {
    let bodies = Arc::new(bodies);
    Arc::new(fetch_fn(move |request: FetchRequest| {
        let body = bodies.get(request.url().as_str()).cloned();
        async move {
            let body = body.ok_or_else(|| -> FetchError { "unknown URL".into() })?;
            let meta = ResponseMeta::new().with_content_length(body.len() as u64);
            Ok(Fetched::body(io::Cursor::new(SharedBytes(body)), meta))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_do_not_depend_on_read_sizes() {
        let whole = GenReader::to_vec(7, 1000);
        let mut pieces = Vec::new();
        let mut reader = GenReader::new(7, 1000);
        for size in [1, 3, 8, 13, 100, 1000].iter().cycle() {
            let mut buf = vec![0; *size];
            let n = reader.fill(&mut buf);
            if n == 0 {
                break;
            }
            pieces.extend_from_slice(&buf[..n]);
        }
        assert_eq!(whole, pieces);
        assert_eq!(GenReader::digest(7, 1000), Digest::sha256_of(&whole));
    }
}
