//! `Remembered`: upstream answers kept in memory for a while, bounded in number (keys are
//! chosen by clients): the pass-through checks' answers and blob sizes from `HEAD`.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `max` answers, each for `ttl`. Full, a new answer first drops the expired ones,
/// then the one that expires soonest.
#[derive(Debug)]
pub(super) struct Remembered<K, V> {
    ttl: Duration,
    max: usize,
    answers: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Remembered<K, V> {
    pub(super) fn new(ttl: Duration, max: usize) -> Self {
        Self { ttl, max, answers: Mutex::default() }
    }

    /// The answer for `key`, if one younger than the TTL is kept.
    pub(super) fn get(&self, key: &K) -> Option<V> {
        let answers = self.answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        answers.get(key).filter(|(_, until)| *until > Instant::now()).map(|(value, _)| value.clone())
    }

    /// Keep `value` as the answer for `key` for the TTL (none is kept with a zero TTL).
    pub(super) fn insert(&self, key: K, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut answers = self.answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if answers.len() >= self.max {
            answers.retain(|_, (_, until)| *until > now);
        }
        if answers.len() >= self.max
            && let Some(soonest) = answers.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| k.clone())
        {
            answers.remove(&soonest);
        }
        answers.insert(key, (value, now + self.ttl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_stay_bounded_and_the_oldest_go_first() {
        let remembered = Remembered::new(Duration::from_secs(60), 3);
        for i in 0..5 {
            remembered.insert(i, i * 10);
        }
        assert_eq!((remembered.get(&0), remembered.get(&1)), (None, None));
        assert_eq!((remembered.get(&2), remembered.get(&4)), (Some(20), Some(40)));
        let answers = remembered.answers.lock().unwrap();
        assert_eq!(answers.len(), 3);
    }

    #[test]
    fn expired_answers_are_not_given_and_a_zero_ttl_keeps_none() {
        let remembered = Remembered::new(Duration::from_secs(60), 3);
        remembered.insert("k", 1);
        let past = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        remembered.answers.lock().unwrap().get_mut("k").unwrap().1 = past;
        assert_eq!(remembered.get(&"k"), None);
        let none = Remembered::new(Duration::ZERO, 3);
        none.insert("k", 1);
        assert_eq!(none.get(&"k"), None);
    }
}
