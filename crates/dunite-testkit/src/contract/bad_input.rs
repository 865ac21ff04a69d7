//! Bad input gets a typed error and stores nothing.

use dunite_core::{DatabaseOptions, Error as CoreError, EvictionPolicy};

use super::{Bad, ContractCache, Item, Opened, core_error, open};
use crate::{DiskUsage, TestBackend, disk_usage};

/// A cache capped at `max_bytes` on SQLite.
async fn cache<C: ContractCache>(max_bytes: u64) -> Opened<C> {
    open::<C>(
        TestBackend::Sqlite,
        &DatabaseOptions::new(),
        EvictionPolicy::new(max_bytes).without_safety_tick(),
        false,
    )
    .await
    .expect("SQLite is always there")
}

/// Nothing counted, no row, no file (payload or temporary).
async fn assert_nothing_stored<C: ContractCache>(opened: &Opened<C>) {
    assert_eq!(opened.cache.total_bytes().await.expect("total"), 0);
    assert_eq!(opened.cache.entry_count().await.expect("entry count"), 0);
    assert_eq!(disk_usage(opened.dir()), DiskUsage::default());
    opened.check_consistency().await.expect("consistent");
}

/// Store `item` the `bad` way; the core error it must fail with.
async fn refused<C: ContractCache>(opened: &Opened<C>, item: &Item, bad: Bad) -> (C::Key, CoreError) {
    let (key, result) = opened.cache.put_bad(item, bad).await;
    match result {
        Ok(()) => panic!("{item:?} stored the bad way {bad:?}"),
        Err(error) => {
            let core = core_error::<C>(&error).clone();
            (key, core)
        }
    }
}

/// Bytes that are not those of the digest expected: a `DigestMismatch` naming the expected
/// digest, the key absent, nothing stored.
///
/// # Panics
///
/// When the contract is broken.
pub async fn a_digest_mismatch_stores_nothing<C: ContractCache>() {
    let opened = cache::<C>(1 << 20).await;
    let item = Item::new(1, 1000);
    let (key, err) = refused(&opened, &item, Bad::WrongDigest).await;
    assert!(matches!(err, CoreError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&item.sha256().to_string()), "{err}");
    assert!(!opened.cache.contains(&key).await.expect("contains"));
    assert_nothing_stored(&opened).await;
}

/// A stream shorter than its declared size is `Truncated`, one longer is `TooLong`, and
/// neither stores anything.
///
/// # Panics
///
/// When the contract is broken.
pub async fn size_mismatches_store_nothing<C: ContractCache>() {
    let opened = cache::<C>(1 << 20).await;
    let item = Item::new(3, 1000);
    let (_, err) = refused(&opened, &item, Bad::DeclaredSize(1001)).await;
    assert!(matches!(err, CoreError::Truncated { expected: 1001, received: 1000 }), "{err}");
    let (_, err) = refused(&opened, &item, Bad::DeclaredSize(999)).await;
    assert!(matches!(err, CoreError::TooLong { expected: 999 }), "{err}");
    assert_nothing_stored(&opened).await;
}

/// A stream that fails after 40,000 of its 100,000 bytes is a `Source` error that counted
/// what it received, and stores nothing.
///
/// # Panics
///
/// When the contract is broken.
pub async fn a_cut_stream_stores_nothing<C: ContractCache>() {
    let opened = cache::<C>(1 << 20).await;
    let item = Item::new(4, 100_000);
    let (_, err) = refused(&opened, &item, Bad::Cut { good: 40_000 }).await;
    assert!(matches!(err, CoreError::Source { received: 40_000, .. }), "{err}");
    assert_nothing_stored(&opened).await;
}

/// On a cache capped at 10,000 bytes holding 5,000: an entry of 10,001 bytes is `TooLarge`,
/// before any byte is read when its size is declared and as soon as its stream crosses the
/// cap when it is not; it evicts nothing and leaves no temporary file.
///
/// # Panics
///
/// When the contract is broken.
pub async fn an_entry_over_the_cap_is_refused_before_it_evicts_anything<C: ContractCache>() {
    let opened = cache::<C>(10_000).await;
    let kept = opened.cache.put(&Item::new(5, 5_000)).await.expect("store").key;

    let item = Item::new(6, 10_001);
    let (_, err) = refused(&opened, &item, Bad::OverCap { declared: true }).await;
    assert!(matches!(err, CoreError::TooLarge { size: 10_001, max_bytes: 10_000 }), "{err}");
    // Size unknown up front: refused as soon as the stream crosses the cap.
    let (_, err) = refused(&opened, &item, Bad::OverCap { declared: false }).await;
    assert!(matches!(err, CoreError::TooLarge { max_bytes: 10_000, .. }), "{err}");

    assert!(
        opened.cache.contains(&kept).await.expect("contains"),
        "the refused entry must not have evicted anything"
    );
    assert_eq!(opened.cache.total_bytes().await.expect("total"), 5_000);
    assert_eq!(disk_usage(opened.dir()).temp_files, 0);
    opened.check_consistency().await.expect("consistent");
}
