//! Response bodies read from a file: the one way a cached payload (a blob, a download) is
//! streamed to a client.
//!
//! Each chunk is read with positioned reads into a buffer that becomes the chunk itself (no
//! second copy). A read first tries `preadv2(RWF_NOWAIT)` on the runtime's own thread: it
//! copies what the page cache holds and never waits for the disk. Only what is not cached
//! is read on Tokio's blocking pool. Why:
//!
//! - A read per 4 KiB on the blocking pool (what `ReaderStream::new` over `tokio::fs::File`
//!   does) makes the thread hop, not the copy, the cost of a hit: about 100 MB/s per client.
//! - With 256 KiB reads on the blocking pool, a profile of 64 clients of a cached 1 MiB blob
//!   still spent about a third of the server's CPU in context switches and wake-ups
//!   (`finish_task_switch`, `_raw_spin_unlock_irqrestore`), as much as in the two copies.
//!   A hot blob is in the page cache; copying it from there costs microseconds.
//! - [`CHUNK`] bounds the memory of a response (one chunk in flight) and so of the server
//!   under many clients: 64 responses hold 16 MiB of chunks at most.

use std::fs::File;
use std::io;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use futures_util::stream;

use crate::metrics::ByteMeter;

/// The size of each read, and so of each chunk handed to the connection.
pub(crate) const CHUNK: usize = 256 << 10;

/// A body of the `len` bytes of `file` from offset `start`, counting what it yields into
/// `served` (`dunite_bytes_served_total`).
pub(crate) fn file_body(file: File, start: u64, len: u64, served: &ByteMeter) -> Body {
    let end = start + len;
    let served = served.clone();
    let chunks = stream::unfold((Arc::new(file), start), move |(file, pos)| {
        let served = served.clone();
        async move {
            if pos >= end {
                return None;
            }
            let want = usize::try_from(end - pos).unwrap_or(CHUNK).min(CHUNK);
            match read_chunk(Arc::clone(&file), pos, want).await {
                Ok(chunk) => {
                    served.add(chunk.len() as u64);
                    let next = pos + chunk.len() as u64;
                    Some((Ok(chunk), (file, next)))
                }
                // The stream ends after an error: the client sees a short body.
                Err(error) => Some((Err(error), (file, end))),
            }
        }
    });
    Body::from_stream(chunks)
}

/// `want` bytes at `pos`: from the page cache without blocking if it holds them all, the
/// rest on the blocking pool. A file that ends early is an error: the response promised its
/// length.
async fn read_chunk(file: Arc<File>, pos: u64, want: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; want];
    let filled = read_cached(&file, &mut buf, pos)?;
    if filled == want {
        return Ok(Bytes::from(buf));
    }
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt as _;
        let mut filled = filled;
        // Bounded: each turn reads at least one byte or returns.
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], pos + filled as u64) {
                Ok(0) => return Err(short_file()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

/// Fill `buf` from `pos` with what the page cache holds, without waiting for the disk; how
/// many bytes that was (fewer than asked when the rest is not cached, or the file system
/// does not support `RWF_NOWAIT`).
fn read_cached(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    use rustix::io::{Errno, ReadWriteFlags};
    let mut filled = 0;
    // Bounded: each turn reads at least one byte or returns.
    while filled < buf.len() {
        let mut slices = [io::IoSliceMut::new(&mut buf[filled..])];
        match rustix::io::preadv2(file, &mut slices, pos + filled as u64, ReadWriteFlags::NOWAIT) {
            Ok(0) => return Err(short_file()),
            Ok(n) => filled += n,
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

fn short_file() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the file is shorter than its entry")
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn file_of(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    #[tokio::test]
    async fn a_body_is_the_range_across_chunk_boundaries_and_is_counted() {
        let bytes: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let metrics = crate::metrics::Metrics::new();
        let served = metrics.served("blobs", crate::metrics::ByteSource::Cache);
        for (start, len) in [(0, bytes.len()), (5, 2 * CHUNK), (CHUNK - 1, CHUNK + 2), (7, 0)] {
            let body = file_body(file_of(&bytes), start as u64, len as u64, &served);
            let got = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            assert_eq!(&got[..], &bytes[start..start + len], "start {start}, len {len}");
        }
        assert_eq!(served.total(), (bytes.len() + 3 * CHUNK + 2) as u64);
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_entry_ends_the_body_in_an_error() {
        let metrics = crate::metrics::Metrics::new();
        let body = file_body(file_of(&[1; 100]), 0, 200, &metrics.upstream_bytes());
        assert!(axum::body::to_bytes(body, usize::MAX).await.is_err());
    }
}
