//! How large a cache may grow and how a pass evicts.

use std::time::Duration;

use crate::{Error, Result};

/// How large a cache may grow and how an eviction pass brings it back.
///
/// A pass starts only when the accounted total is **over** `max_bytes`, and then evicts down
/// to `low_watermark`, so a cache hovering at its cap is not evicted on every store.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use dunite_core::EvictionPolicy;
///
/// let policy = EvictionPolicy::new(20 << 30)
///     .with_low_watermark(18 << 30)
///     .with_batch_size(512)
///     .with_safety_tick(Duration::from_secs(300));
/// assert_eq!(policy.max_bytes(), 20 << 30);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictionPolicy {
    max_bytes: u64,
    low_watermark: u64,
    batch_size: usize,
    pass_time_budget: Duration,
    debounce: Duration,
    safety_tick: Option<Duration>,
    retry_initial: Duration,
    retry_max: Duration,
}

impl EvictionPolicy {
    /// A policy with cap `max_bytes` and defaults for everything else: a low watermark at 90%
    /// of the cap, batches of 256 entries, a pass time budget of 250 ms, a 20 ms debounce
    /// window, a safety tick every five minutes and retries backing off from 100 ms to 30 s.
    #[must_use]
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            low_watermark: max_bytes / 10 * 9 + (max_bytes % 10) * 9 / 10,
            batch_size: 256,
            pass_time_budget: Duration::from_millis(250),
            debounce: Duration::from_millis(20),
            safety_tick: Some(Duration::from_secs(300)),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
        }
    }

    /// Evict down to `bytes` once over the cap. Must not exceed the cap.
    #[must_use]
    pub fn with_low_watermark(mut self, bytes: u64) -> Self {
        self.low_watermark = bytes;
        self
    }

    /// How many least-recently-used entries a pass selects at a time (at least 1).
    #[must_use]
    pub fn with_batch_size(mut self, entries: usize) -> Self {
        self.batch_size = entries;
        self
    }

    /// How long one pass may spend removing before it stops at a chunk boundary and hands over
    /// to a fresh pass (on a fresh connection). The clock starts once the pass holds its
    /// connection and has read a total over the cap, and the first chunk is always removed:
    /// waiting for a connection or a slow database never stops a pass before it makes progress.
    #[must_use]
    pub fn with_pass_time_budget(mut self, budget: Duration) -> Self {
        self.pass_time_budget = budget;
        self
    }

    /// After a poke, wait `window` before starting the pass, so the rest of a burst of stores
    /// lands in the same pass. The cap may be exceeded for about this long; an explicit pass
    /// ([`evict_now`](crate::DebouncedEvictor::evict_now)) does not wait. Zero disables it.
    #[must_use]
    pub fn with_debounce(mut self, window: Duration) -> Self {
        self.debounce = window;
        self
    }

    /// Run a pass every `period` even without pokes, so an idle cache still finishes a pass
    /// that failed or was cut short.
    #[must_use]
    pub fn with_safety_tick(mut self, period: Duration) -> Self {
        self.safety_tick = Some(period);
        self
    }

    /// Run passes only when poked, asked, or retrying.
    #[must_use]
    pub fn without_safety_tick(mut self) -> Self {
        self.safety_tick = None;
        self
    }

    /// Back off from `initial` to at most `max` (doubling) while passes fail.
    #[must_use]
    pub fn with_retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_initial = initial;
        self.retry_max = max;
        self
    }

    /// The cap: a pass starts when the accounted total exceeds it.
    #[must_use]
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The total a pass evicts down to.
    #[must_use]
    pub fn low_watermark(&self) -> u64 {
        self.low_watermark
    }

    /// Entries selected per batch.
    #[must_use]
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// How long one pass may run before handing over to a fresh one.
    #[must_use]
    pub fn pass_time_budget(&self) -> Duration {
        self.pass_time_budget
    }

    /// The debounce window after a poke.
    #[must_use]
    pub fn debounce(&self) -> Duration {
        self.debounce
    }

    /// The period of the safety tick, if any.
    #[must_use]
    pub fn safety_tick(&self) -> Option<Duration> {
        self.safety_tick
    }

    /// The delay before retry number `attempt` (0-based) after a failed or unfinished pass.
    #[must_use]
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.retry_initial.saturating_mul(factor).min(self.retry_max)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.low_watermark > self.max_bytes {
            return Err(Error::InvalidPolicy("low watermark exceeds max_bytes"));
        }
        if self.batch_size == 0 {
            return Err(Error::InvalidPolicy("batch size must be at least 1"));
        }
        if self.pass_time_budget.is_zero() {
            return Err(Error::InvalidPolicy("pass time budget must be positive"));
        }
        if self.safety_tick.is_some_and(|t| t.is_zero()) {
            return Err(Error::InvalidPolicy("safety tick period must be positive"));
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return Err(Error::InvalidPolicy("retry backoff must be positive and max >= initial"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_watermark_is_ninety_percent_without_overflow() {
        assert_eq!(EvictionPolicy::new(100).low_watermark(), 90);
        assert_eq!(EvictionPolicy::new(250).low_watermark(), 225);
        assert_eq!(EvictionPolicy::new(7).low_watermark(), 6);
        assert!(EvictionPolicy::new(u64::MAX).low_watermark() < u64::MAX);
        EvictionPolicy::new(u64::MAX).validate().unwrap();
    }

    #[test]
    fn backoff_doubles_and_saturates() {
        let p =
            EvictionPolicy::new(1).with_retry_backoff(Duration::from_millis(10), Duration::from_millis(70));
        assert_eq!(p.retry_delay(0), Duration::from_millis(10));
        assert_eq!(p.retry_delay(2), Duration::from_millis(40));
        assert_eq!(p.retry_delay(3), Duration::from_millis(70));
        assert_eq!(p.retry_delay(u32::MAX), Duration::from_millis(70));
    }

    #[test]
    fn inconsistent_policies_are_rejected() {
        assert!(EvictionPolicy::new(10).with_low_watermark(11).validate().is_err());
        assert!(EvictionPolicy::new(10).with_batch_size(0).validate().is_err());
        assert!(EvictionPolicy::new(10).with_safety_tick(Duration::ZERO).validate().is_err());
    }
}
