//! Response bodies read from a file: the one way a cached payload (a blob, a download) is
//! streamed to a client.
//!
//! Each chunk is read on Tokio's blocking pool into a fresh buffer that becomes the chunk
//! itself (no second copy), and the next chunk's read is
//! started as soon as a chunk is handed to the connection, so the disk read of chunk n+1
//! overlaps the socket write of chunk n. Why these sizes:
//!
//! - A read per 4 KiB (what `ReaderStream::new` does) makes the hop to the blocking pool,
//!   not the copy, the cost of a hit: about 100 MB/s per client.
//! - [`CHUNK`] bounds the memory of a response (two chunks: one being written, one being
//!   read) and so of the server under many clients: 64 responses hold 32 MiB at most.
//!   Larger chunks bought no more throughput in `cargo xtask bench --only http`.

use std::io::{self, Read as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use bytes::Bytes;
use futures_util::stream;
use tokio::task::JoinHandle;

/// The size of each read, and so of each chunk handed to the connection.
pub(crate) const CHUNK: usize = 256 << 10;

/// A body of the `len` bytes of `file` from its current position `start`, counting what it yields into `served`
/// (`dunite_bytes_served_total`).
pub(crate) fn file_body(file: std::fs::File, start: u64, len: u64, served: &Arc<AtomicU64>) -> Body {
    let file = Arc::new(file);
    let end = start + len;
    let first = (len > 0).then(|| read(Arc::clone(&file), start, end));
    let served = Arc::clone(served);
    let chunks = stream::unfold((file, first, start), move |(file, pending, pos)| {
        let served = Arc::clone(&served);
        async move {
            let chunk = match pending?.await {
                Ok(Ok(chunk)) => chunk,
                Ok(Err(error)) => return Some((Err(error), (file, None, end))),
                Err(join) => return Some((Err(io::Error::other(join)), (file, None, end))),
            };
            let pos = pos + chunk.len() as u64;
            // Read ahead: the next chunk is read while this one is written.
            let next = (pos < end).then(|| read(Arc::clone(&file), pos, end));
            served.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            Some((Ok(chunk), (file, next, pos)))
        }
    });
    Body::from_stream(chunks)
}

/// Read the next `min(CHUNK, end - pos)` bytes from `file`'s position on the blocking pool
/// (one read is in flight per body at a time, so the position is this body's). The buffer is
/// not zeroed first: `read_to_end` fills spare capacity. A file that ends early is an error:
/// the response promised `end - start` bytes.
fn read(file: Arc<std::fs::File>, pos: u64, end: u64) -> JoinHandle<io::Result<Bytes>> {
    tokio::task::spawn_blocking(move || {
        let want = usize::try_from(end - pos).unwrap_or(CHUNK).min(CHUNK);
        let mut buf = Vec::with_capacity(want);
        (&*file).take(want as u64).read_to_end(&mut buf)?;
        if buf.len() < want {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file is shorter than its entry"));
        }
        Ok(Bytes::from(buf))
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Seek as _, SeekFrom, Write as _};

    use super::*;

    fn file_of(bytes: &[u8]) -> std::fs::File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    #[tokio::test]
    async fn a_body_is_the_range_across_chunk_boundaries_and_is_counted() {
        let bytes: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let served = Arc::new(AtomicU64::new(0));
        for (start, len) in [(0, bytes.len()), (5, 2 * CHUNK), (CHUNK - 1, CHUNK + 2), (7, 0)] {
            let mut file = file_of(&bytes);
            file.seek(SeekFrom::Start(start as u64)).unwrap();
            let body = file_body(file, start as u64, len as u64, &served);
            let got = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            assert_eq!(&got[..], &bytes[start..start + len], "start {start}, len {len}");
        }
        assert_eq!(served.load(Ordering::Relaxed), (bytes.len() + 3 * CHUNK + 2) as u64);
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_entry_ends_the_body_in_an_error() {
        let mut file = file_of(&[1; 100]);
        file.seek(SeekFrom::Start(0)).unwrap();
        let body = file_body(file, 0, 200, &Arc::new(AtomicU64::new(0)));
        assert!(axum::body::to_bytes(body, usize::MAX).await.is_err());
    }
}
