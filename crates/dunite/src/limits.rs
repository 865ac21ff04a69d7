//! Limits on concurrent upstream fills, in all and per client address.
//!
//! A request that misses takes a [`FillPermit`] before it may start a fill; a request that
//! joins a fill already running needs none (it costs no upstream request). The permit lives
//! as long as the fill's upstream body, so a fill counts until its last byte arrived. Past a
//! limit the request is answered `429 Too Many Requests` with `Retry-After`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// What `Retry-After` says, in seconds, when a limit is reached.
pub(crate) const RETRY_AFTER_SECS: u64 = 1;

/// Fills running per client address.
type PerClient = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// How many fills may run at once.
#[derive(Debug)]
pub(crate) struct FillLimits {
    global: Arc<tokio::sync::Semaphore>,
    capacity: usize,
    per_client: usize,
    clients: PerClient,
}

/// Why no fill may start now.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Busy {
    /// The server runs its most fills.
    #[error("too many upstream fetches in progress; retry shortly")]
    Server,
    /// This client runs its most fills.
    #[error("too many upstream fetches in progress for this client; retry shortly")]
    Client,
}

/// One running fill's place under the limits; given back when dropped.
#[derive(Debug)]
pub(crate) struct FillPermit {
    _global: tokio::sync::OwnedSemaphorePermit,
    client: Option<(IpAddr, PerClient)>,
}

impl Drop for FillPermit {
    fn drop(&mut self) {
        if let Some((ip, clients)) = self.client.take() {
            let mut clients = clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(count) = clients.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    clients.remove(&ip);
                }
            }
        }
    }
}

impl FillLimits {
    /// At most `global` fills at once, and `per_client` for one client address.
    pub(crate) fn new(global: usize, per_client: usize) -> Self {
        Self {
            global: Arc::new(tokio::sync::Semaphore::new(global)),
            capacity: global,
            per_client,
            clients: Arc::default(),
        }
    }

    /// A permit for one more fill by `client` (an unknown address is limited only in all).
    ///
    /// # Errors
    ///
    /// [`Busy`] naming the limit reached.
    pub(crate) fn try_start(&self, client: Option<IpAddr>) -> Result<FillPermit, Busy> {
        let global = Arc::clone(&self.global).try_acquire_owned().map_err(|_| Busy::Server)?;
        let Some(ip) = client.map(client_of) else { return Ok(FillPermit { _global: global, client: None }) };
        let mut clients = self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = clients.entry(ip).or_insert(0);
        if *count >= self.per_client {
            return Err(Busy::Client);
        }
        *count += 1;
        Ok(FillPermit { _global: global, client: Some((ip, Arc::clone(&self.clients))) })
    }

    /// Fills running now.
    pub(crate) fn in_flight(&self) -> usize {
        self.capacity - self.global.available_permits()
    }
}

/// The client an address counts as: itself for IPv4, its /64 for IPv6 (one host holds a whole
/// /64 and may use any address in it).
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

/// A stream that holds `permit` until it ends or is dropped: a fill's upstream body.
pub(crate) fn holding<S>(stream: S, permit: FillPermit) -> impl futures_util::Stream<Item = S::Item> + use<S>
where
    S: futures_util::Stream,
{
    use futures_util::StreamExt as _;
    stream.map(move |item| {
        let _held = &permit;
        item
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_in_all_and_per_client_and_given_back() {
        let limits = FillLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limits.try_start(Some(a)).unwrap();
        let _second = limits.try_start(Some(a)).unwrap();
        assert_eq!(limits.try_start(Some(a)).unwrap_err(), Busy::Client);
        let _third = limits.try_start(Some(b)).unwrap();
        assert_eq!(limits.try_start(Some(b)).unwrap_err(), Busy::Server);
        assert_eq!(limits.in_flight(), 3);
        drop(first);
        assert_eq!(limits.in_flight(), 2);
        let _again = limits.try_start(Some(a)).unwrap();
        assert_eq!(limits.try_start(None).unwrap_err(), Busy::Server);
    }

    #[test]
    fn an_ipv6_client_is_its_64() {
        let limits = FillLimits::new(10, 1);
        let _one = limits.try_start(Some("2001:db8:1:2::1".parse().unwrap())).unwrap();
        let same_64 = limits.try_start(Some("2001:db8:1:2:ffff::9".parse().unwrap()));
        assert_eq!(same_64.unwrap_err(), Busy::Client);
        assert!(limits.try_start(Some("2001:db8:1:3::1".parse().unwrap())).is_ok());
        let _v4 = limits.try_start(Some("192.0.2.1".parse().unwrap())).unwrap();
        let mapped = limits.try_start(Some("::ffff:192.0.2.1".parse().unwrap()));
        assert_eq!(mapped.unwrap_err(), Busy::Client, "an IPv4-mapped address is its IPv4 client");
    }
}
