//! Two `dunite serve` processes sharing one PostgreSQL database and one data directory: one
//! cap for both, eviction passes one at a time across them, and a blob fetched through one
//! served from the cache by the other.

#![allow(clippy::print_stdout, reason = "the interval counts and timings are this test's report")]

use std::path::Path;
use std::time::{Duration, Instant};

use dunite_testkit::pg;

use super::harness::{Dunite, Image, Registry, assert_same_copy, pull};

/// Images pushed; each is pulled through both instances at once.
const IMAGES: u64 = 4;
/// The core's debug lines carry the eviction lock's taking and releasing.
const LOG_LEVEL: &str = "info,dunite_core=debug";
/// The blob cache's namespace (`dunite_oci::NAMESPACE`).
const BLOBS: &str = "oci-blobs";
const BYTES: &str = "dunite_cache_bytes{cache=\"blobs\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_and_directory_keep_one_cap_and_evict_one_at_a_time() {
    let Some(database) = pg::fresh_database().await else {
        return; // No test server, and none required.
    };
    let started = Instant::now();
    let registry = Registry::start().await;
    let mut direct = Vec::new();
    let mut sum = 0;
    for seed in 0..IMAGES {
        let image = Image::build(200 + seed, 3, 400_000);
        image.push(registry.addr, &format!("e2e/shared{seed}")).await;
        let copy = pull(registry.addr, &format!("e2e/shared{seed}")).await.unwrap();
        sum += assert_same_copy(copy.path(), copy.path());
        direct.push(copy);
    }
    let cap = sum / 2;
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("cache");
    let cap_arg = cap.to_string();
    let extra = ["--database-url", database.url()];
    // Both at once: start-up migrations, reconciliation and start-up passes run side by side
    // on the shared database and directory (a file another instance moves or removes during
    // the walk is skipped, not an error).
    let (a, b) = tokio::join!(
        Dunite::start_with_data(registry.addr, &cap_arg, &extra, LOG_LEVEL, &data_dir),
        Dunite::start_with_data(registry.addr, &cap_arg, &extra, LOG_LEVEL, &data_dir),
    );
    let logs = || format!("instance A's log:\n{}\ninstance B's log:\n{}", a.log_text(), b.log_text());

    // Every image through both instances at once.
    let concurrent = Instant::now();
    let mut pulls = tokio::task::JoinSet::new();
    for seed in 0..IMAGES {
        for (name, addr) in [("A", a.addr), ("B", b.addr)] {
            pulls.spawn(async move { (seed, name, pull(addr, &format!("e2e/shared{seed}")).await) });
        }
    }
    while let Some(done) = pulls.join_next().await {
        let (seed, name, dest) = done.unwrap();
        let dest = dest.unwrap_or_else(|e| panic!("pull {seed} through {name} failed: {e}\n{}", logs()));
        assert_same_copy(direct[seed as usize].path(), dest.path());
    }
    let concurrent = concurrent.elapsed();

    let settling = Instant::now();
    let total = settled_total(&a, &b, cap, &data_dir).await;
    let settling = settling.elapsed();
    assert!(total > 0, "the shared blob cache is empty after the pulls (or its total was unreadable)");
    assert!(a.metric("dunite_cache_entries{cache=\"blobs\"}").await > 0);
    for dunite in [&a, &b] {
        assert_eq!(dunite.metric("dunite_cache_max_bytes{cache=\"blobs\"}").await, cap);
    }

    // A blob fetched through A is a hit on B. Pull one image through A until a pull needs
    // no upstream blob (the first refetches what eviction took, and the pass that follows
    // may take a blob the pull has not reached yet); the image, the most recently used and
    // under the cap, then stays cached: B must serve it all from the shared cache.
    let mut refetched = 0;
    let mut a_pulls = 0;
    loop {
        let a_misses = a.metric("dunite_blob_misses_total").await;
        let through_a = pull(a.addr, "e2e/shared0").await.unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        assert_same_copy(direct[0].path(), through_a.path());
        settled_total(&a, &b, cap, &data_dir).await;
        a_pulls += 1;
        let misses = a.metric("dunite_blob_misses_total").await - a_misses;
        if misses == 0 {
            break;
        }
        refetched += misses;
        assert!(a_pulls < 4, "pulls of one image under the cap through A keep missing\n{}", logs());
    }
    let (b_misses, b_hits) =
        (b.metric("dunite_blob_misses_total").await, b.metric("dunite_blob_hits_total").await);
    let through_b = pull(b.addr, "e2e/shared0").await.unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_same_copy(direct[0].path(), through_b.path());
    assert_eq!(
        b.metric("dunite_blob_misses_total").await,
        b_misses,
        "B went upstream for blobs A had just cached\n{}",
        logs()
    );
    assert!(
        b.metric("dunite_blob_hits_total").await >= b_hits + 4,
        "B served the three layers and the config from the shared cache"
    );

    let mut passes = Vec::new();
    let mut elsewhere = Vec::new();
    for dunite in [&a, &b] {
        passes.push(dunite.metric("dunite_evictor_passes_total{cache=\"blobs\"}").await);
        elsewhere.push(dunite.metric("dunite_evictor_passes_elsewhere_total{cache=\"blobs\"}").await);
        assert_eq!(dunite.metric("dunite_evictor_errors_total{cache=\"blobs\"}").await, 0, "{}", logs());
        assert_eq!(dunite.metric("dunite_errors_total").await, 0, "{}", logs());
    }
    let evicted = a.metric("dunite_evictor_evicted_total{cache=\"blobs\"}").await
        + b.metric("dunite_evictor_evicted_total{cache=\"blobs\"}").await;
    assert!(evicted >= 1, "images of twice the cap went through, yet nothing was evicted");

    let ((a_status, a_text), (b_status, b_text)) = tokio::join!(a.stop_with_log(), b.stop_with_log());
    assert!(a_status.success() && b_status.success(), "SIGTERM: A exited {a_status}, B {b_status}");
    let logs = || format!("instance A's log:\n{a_text}\ninstance B's log:\n{b_text}");
    for (name, text) in [("A", &a_text), ("B", &b_text)] {
        assert!(!text.contains(" ERROR "), "errors in {name}'s log\n{}", logs());
        // A store that fails on the database is a WARN (the pull still succeeds, served
        // uncached), as is every other degraded path: none is expected here.
        assert!(!text.contains(" WARN "), "warnings in {name}'s log\n{}", logs());
        assert!(
            !text.contains("PoolTimedOut") && !text.contains("pool timed out"),
            "pool timeouts in {name}'s log\n{}",
            logs()
        );
    }

    // No eviction pass of one instance overlaps one of the other's: each logs `taken` after
    // taking the lock and `released` before releasing it.
    let a_held = lock_intervals(&a_text).unwrap_or_else(|e| panic!("A's log: {e}\n{}", logs()));
    let b_held = lock_intervals(&b_text).unwrap_or_else(|e| panic!("B's log: {e}\n{}", logs()));
    for x in &a_held {
        for y in &b_held {
            assert!(
                x.end <= y.start || y.end <= x.start,
                "A held the {BLOBS} eviction lock over {x:?} and B over {y:?}: they overlap\n{}",
                logs()
            );
        }
    }
    for (name, held, passes) in [("A", &a_held, passes[0]), ("B", &b_held, passes[1])] {
        // Every pass that ran took the lock; a pass may still have run between the metrics
        // read and the stop.
        assert!(
            held.len() as u64 >= passes,
            "{name} ran {passes} blob passes but logged {} lock intervals",
            held.len()
        );
    }
    assert!(!a_held.is_empty() || !b_held.is_empty(), "no eviction pass took the lock");

    let held_for = |held: &[Held]| -> (Duration, Duration) {
        let each = held.iter().map(|h| Duration::from_nanos(h.end - h.start));
        (each.clone().sum(), each.max().unwrap_or_default())
    };
    let ((a_sum, a_max), (b_sum, b_max)) = (held_for(&a_held), held_for(&b_held));
    // How close the two instances' holdings came (the overlap check passed, so no underflow).
    let closest = a_held
        .iter()
        .flat_map(|x| {
            b_held.iter().map(move |y| if x.end <= y.start { y.start - x.end } else { x.start - y.end })
        })
        .min()
        .map(Duration::from_nanos);
    let warnings = |text: &str| text.lines().filter(|line| line.contains(" WARN ")).count();
    println!(
        "instances: cap {cap} B (images {sum} B), settled at {total} B; eviction lock intervals: \
         A {} (held {a_sum:?} in all, longest {a_max:?}), B {} (held {b_sum:?}, longest {b_max:?}); \
         closest gap between A's and B's {closest:?}; blob passes A {} B {}, passes elsewhere A {} B \
         {}, {evicted} evicted; {refetched} blobs refetched by A in {a_pulls} pulls; WARN lines A {} B {}; {} \
         concurrent pulls {concurrent:?}, settling {settling:?}, in all {:?}",
        a_held.len(),
        b_held.len(),
        passes[0],
        passes[1],
        elsewhere[0],
        elsewhere[1],
        warnings(&a_text),
        warnings(&b_text),
        2 * IMAGES,
        started.elapsed()
    );
}

/// Poll (with a deadline) until both instances report the same blob total, at most `cap`,
/// and the blob files in the shared `data_dir` add up to it; returns it.
async fn settled_total(a: &Dunite, b: &Dunite, cap: u64, data_dir: &Path) -> u64 {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (a_total, b_total) = (a.metric(BYTES).await, b.metric(BYTES).await);
        let on_disk = bytes_under(&data_dir.join("blobs"));
        if a_total <= cap && a_total == b_total && on_disk == a_total {
            return a_total;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "the shared blob cache did not settle under its cap of {cap}: A reports {a_total}, B \
             {b_total}, the blob files hold {on_disk}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bytes of the regular files under `dir`, recursively (files may go while it walks).
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut sum = 0;
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => sum += bytes_under(&entry.path()),
            Ok(kind) if kind.is_file() => sum += entry.metadata().map_or(0, |m| m.len()),
            _ => {}
        }
    }
    sum
}

/// One holding of the eviction lock, in nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy)]
struct Held {
    start: u64,
    end: u64,
}

/// The blob namespace's lock intervals in a log: each `eviction lock taken` paired with the
/// next `eviction lock released`. Err on an unpaired line or a timestamp without sub-second
/// digits (too coarse to tell passes apart).
fn lock_intervals(log: &str) -> Result<Vec<Held>, String> {
    let mut held = Vec::new();
    let mut open: Option<u64> = None;
    for line in log.lines() {
        let taken = line.contains("eviction lock taken");
        if !taken && !line.contains("eviction lock released") {
            continue;
        }
        if !line.split_whitespace().any(|word| word == format!("namespace={BLOBS}")) {
            continue;
        }
        let stamp = line.split_whitespace().next().unwrap_or_default();
        let at = parse_timestamp(stamp).ok_or_else(|| {
            format!(
                "cannot read a timestamp with sub-second digits from {line:?}; the server's log \
                 must print RFC 3339 UTC times with (at least) microseconds for this check"
            )
        })?;
        match (taken, open) {
            (true, None) => open = Some(at),
            (false, Some(start)) if start <= at => {
                held.push(Held { start, end: at });
                open = None;
            }
            (true, Some(_)) => return Err(format!("taken again before released: {line:?}")),
            (false, Some(_)) => return Err(format!("released before it was taken: {line:?}")),
            (false, None) => return Err(format!("released without being taken: {line:?}")),
        }
    }
    match open {
        Some(start) => Err(format!("taken at {start} ns and never released")),
        None => Ok(held),
    }
}

/// Nanoseconds since the Unix epoch of an RFC 3339 UTC time with fractional seconds, as the
/// server's log prints them (`2025-01-02T03:04:05.678901Z`); `None` for anything else.
fn parse_timestamp(stamp: &str) -> Option<u64> {
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(str::parse::<u64>);
    let (year, month, day) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let (hms, fraction) = time.split_once('.')?;
    if fraction.is_empty() || fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut parts = hms.splitn(3, ':').map(str::parse::<u64>);
    let (hour, minute, second) = (parts.next()?.ok()?, parts.next()?.ok()?, parts.next()?.ok()?);
    let nanos: u64 = format!("{fraction:0<9}").parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let (era, yoe) = (y / 400, y % 400);
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(((days * 24 + hour) * 60 + minute) * 60 * 1_000_000_000 + second * 1_000_000_000 + nanos)
}

#[test]
fn timestamps_are_read_to_the_nanosecond_and_coarse_ones_refused() {
    assert_eq!(parse_timestamp("1970-01-01T00:00:01.5Z"), Some(1_500_000_000));
    assert_eq!(parse_timestamp("2000-03-01T00:00:00.000001Z"), Some(951_868_800_000_001_000));
    assert_eq!(parse_timestamp("2025-01-02T03:04:05Z"), None, "no sub-second digits");
    assert_eq!(parse_timestamp("Jan 2 03:04:05"), None);
    let log = "2025-01-02T03:04:05.000001Z DEBUG x: eviction lock taken namespace=oci-blobs\n\
               2025-01-02T03:04:05.000002Z DEBUG x: eviction lock taken namespace=oci-manifests\n\
               2025-01-02T03:04:05.000003Z DEBUG x: eviction lock released namespace=oci-blobs\n";
    let held = lock_intervals(log).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].end - held[0].start, 2_000);
    assert!(lock_intervals(&log[..log.len() / 2]).is_err(), "a taken lock never released");
}
