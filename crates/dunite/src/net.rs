//! Where dunite's outgoing requests may go: which addresses are public (`is_public`), a
//! resolver that keeps host names off the others (`PublicOnly`), and the download
//! allowlist ([`AllowList`]: hosts and ports).
//!
//! Both upstream clients (registries in `upstream.rs`, downloads in `dl/fetch.rs`) are built
//! on these, so there is one definition of "private" and one resolver: an upstream or a
//! download host must not be able to point the mirror at the machine it runs on, its
//! network, or a cloud metadata address (`169.254.169.254`).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Whether a client may reach loopback, private, link-local and other non-public addresses
/// through host names and redirects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrivateNetworks {
    /// Only public addresses (the default).
    Refused,
    /// Any address: the operator said so (`--dl-allow-private-networks`,
    /// `--upstream-allow-private`).
    Allowed,
}

impl PrivateNetworks {
    /// [`Allowed`](Self::Allowed) if `allowed`, the form flags come in.
    pub(crate) fn allowed_if(allowed: bool) -> Self {
        if allowed { Self::Allowed } else { Self::Refused }
    }
}

/// Whether `ip` is an address the mirror may reach without explicit permission: a globally
/// routed unicast address. IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64,
/// 6to4) are judged by that address.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (18..20).contains(&b)) // benchmarking
                || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast (deprecated)
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                let [h1, h2] = hi.to_be_bytes();
                let [l1, l2] = lo.to_be_bytes();
                IpAddr::V4(Ipv4Addr::new(h1, h2, l1, l2))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            // IPv4-compatible (::a.b.c.d, deprecated), NAT64 (64:ff9b::/96) and SIIT's
            // IPv4-translated (::ffff:0:a.b.c.d).
            if segments[..6] == [0; 6]
                || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
                || segments[..6] == [0, 0, 0, 0, 0xffff, 0]
            {
                return !v6.is_loopback()
                    && !v6.is_unspecified()
                    && is_public(embedded(segments[6], segments[7]));
            }
            // 6to4 (2002:a.b.c.d::/48).
            if segments[0] == 0x2002 {
                return is_public(embedded(segments[1], segments[2]));
            }
            // The local-use NAT64 prefix (64:ff9b:1::/48) and Teredo (2001::/32) reach IPv4
            // hosts the mirror cannot judge: never public.
            if segments[..3] == [0x64, 0xff9b, 1] || segments[..2] == [0x2001, 0] {
                return false;
            }
            let first = segments[0];
            !(v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (first == 0x2001 && segments[1] == 0x0db8)) // documentation
        }
    }
}

/// Resolves host names for an upstream client, keeping only public addresses unless private
/// networks are allowed or the name is one the operator configured (`trusting`).
///
/// The check is at resolution, so it holds for the addresses actually connected to (a name
/// that resolves differently on a second look gains nothing). A URL with an IP literal never
/// reaches a resolver: its address is checked where the URL is accepted (the download
/// allowlist, the registry client's redirect policy and token realms).
#[derive(Debug)]
pub(crate) struct PublicOnly {
    private: PrivateNetworks,
    /// Names that may resolve to any address, lower-case: the configured upstream hosts.
    trusted: BTreeSet<String>,
}

impl PublicOnly {
    /// A resolver that refuses non-public addresses unless `private` allows them.
    pub(crate) fn new(private: PrivateNetworks) -> Self {
        Self { private, trusted: BTreeSet::new() }
    }

    /// The same, letting `names` (host names the operator configured) resolve to any address.
    pub(crate) fn trusting(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.trusted.extend(names.into_iter().map(|n| n.to_ascii_lowercase()));
        self
    }
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let any = self.private == PrivateNetworks::Allowed || self.trusted.contains(&host);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let usable: Vec<_> = addrs.into_iter().filter(|a| any || is_public(a.ip())).collect();
            if usable.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (private networks are not allowed)"
                )
                .into());
            }
            Ok(Box::new(usable.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The download allowlist (`--dl-allow`): hosts the download proxy may fetch from, each on
/// one port.
///
/// An entry is `host` or `host:port` (an IPv6 address in brackets: `[::1]`, `[::1]:8080`).
/// A bare host allows its scheme's default port only (80 for `http`, 443 for `https`), so
/// allowing a web server does not open its SSH or Redis port; `host:port` allows exactly that
/// port, with either scheme. Host names compare as URLs spell them (lower-case, IDNA).
///
/// ```
/// let allow = dunite::net::AllowList::parse(["files.example", "127.0.0.1:8080"])?;
/// let url = |s: &str| url::Url::parse(s).unwrap();
/// assert!(allow.permits(&url("https://files.example/tool.tar")));
/// assert!(!allow.permits(&url("http://files.example:6379/")));
/// assert!(allow.permits(&url("http://127.0.0.1:8080/f")));
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<AllowEntry>,
}

/// One allowlist entry: a host, and its port if one was given.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AllowEntry {
    host: url::Host<String>,
    port: Option<u16>,
}

impl AllowList {
    /// Parse `entries` (`host` or `host:port` each).
    ///
    /// # Errors
    ///
    /// A message naming the first entry that is not `host` or `host:port`.
    pub fn parse<S: AsRef<str>>(entries: impl IntoIterator<Item = S>) -> Result<Self, String> {
        let entries = entries.into_iter().map(|e| AllowEntry::parse(e.as_ref())).collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// Whether `url` (`http` or `https`) is on the list: its host, on a port its entry allows.
    #[must_use]
    pub fn permits(&self, url: &url::Url) -> bool {
        let default = match url.scheme() {
            "http" => 80,
            "https" => 443,
            _ => return false,
        };
        let Some(host) = url.host() else { return false };
        let host = host.to_owned();
        let port = url.port().unwrap_or(default);
        self.entries.iter().any(|e| e.host == host && e.port.unwrap_or(default) == port)
    }

    /// Whether nothing is allowed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl AllowEntry {
    fn parse(text: &str) -> Result<Self, String> {
        let wrong =
            || format!("{text:?} is not HOST or HOST:PORT (an IPv6 address goes in brackets: [::1]:8080)");
        let trimmed = text.trim();
        let (host, port) = match trimmed.strip_prefix('[') {
            Some(rest) => {
                let (inside, after) = rest.split_once(']').ok_or_else(wrong)?;
                let port = match after {
                    "" => None,
                    after => Some(after.strip_prefix(':').ok_or_else(wrong)?),
                };
                (&trimmed[..inside.len() + 2], port)
            }
            None => match trimmed.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (trimmed, None),
            },
        };
        if host.is_empty() {
            return Err(wrong());
        }
        let host = url::Host::parse(host).map_err(|e| format!("{}: {e}", wrong()))?;
        let port = match port {
            None => None,
            Some(port) => Some(port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(wrong)?),
        };
        Ok(Self { host, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "2002:c0a8:0101::1",
            "2002:7f00:1::",
            "fec0::1",
            "2001:db8::1",
            "198.18.0.1",
            "192.0.0.8",
            "240.0.0.1",
            "192.88.99.1",
            "64:ff9b:1::a9fe:a9fe",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::ffff:0:a9fe:a9fe",
            "255.255.255.255",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in
            ["93.184.216.34", "1.1.1.1", "2606:4700::1111", "64:ff9b::5db8:d822", "2002:5db8:d822::1"]
        {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn a_bare_host_allows_its_schemes_default_port_only() {
        let allow = AllowList::parse(["Files.Example"]).unwrap();
        assert!(allow.permits(&url("http://files.example/f")));
        assert!(allow.permits(&url("https://files.example/f")));
        assert!(allow.permits(&url("http://files.example:80/f")));
        assert!(allow.permits(&url("https://FILES.example:443/f")));
        for refused in [
            "http://files.example:22/",
            "http://files.example:6379/",
            "http://files.example:443/",
            "https://files.example:80/",
            "https://files.example:8443/",
            "https://other.example/",
            "https://sub.files.example/",
        ] {
            assert!(!allow.permits(&url(refused)), "{refused}");
        }
    }

    #[test]
    fn a_host_with_a_port_allows_exactly_that_port_with_either_scheme() {
        let allow = AllowList::parse(["files.example:8080", "127.0.0.1:5000", "[::1]:8443", "[2001:db8::1]"])
            .unwrap();
        assert!(allow.permits(&url("http://files.example:8080/f")));
        assert!(allow.permits(&url("https://files.example:8080/f")));
        assert!(!allow.permits(&url("http://files.example/f")));
        assert!(!allow.permits(&url("https://files.example/f")));
        assert!(allow.permits(&url("http://127.0.0.1:5000/f")));
        assert!(!allow.permits(&url("http://127.0.0.1:5001/f")));
        assert!(!allow.permits(&url("http://127.0.0.1/f")));
        assert!(allow.permits(&url("https://[::1]:8443/f")));
        assert!(!allow.permits(&url("https://[::1]/f")));
        assert!(allow.permits(&url("https://[2001:db8::1]/f")));
        assert!(allow.permits(&url("http://[2001:db8:0::1]/f")), "addresses compare as addresses");
        assert!(!allow.permits(&url("http://[2001:db8::1]:22/f")));
        assert!(!allow.permits(&url("ftp://files.example:8080/f")));
        // An explicit default port is that port, for either scheme.
        let allow = AllowList::parse(["files.example:80"]).unwrap();
        assert!(allow.permits(&url("http://files.example/f")));
        assert!(allow.permits(&url("https://files.example:80/f")));
        assert!(!allow.permits(&url("https://files.example/f")));
    }

    #[test]
    fn entries_that_are_not_host_or_host_and_port_are_refused() {
        for bad in [
            "",
            ":80",
            "files.example:",
            "files.example:0",
            "files.example:65536",
            "files.example:http",
            "https://files.example",
            "files.example/path",
            "::1",
            "[::1",
            "[::1]8080",
            "[not-an-address]",
            "a b",
        ] {
            let message = AllowList::parse([bad]).expect_err(bad);
            assert!(message.contains("HOST:PORT"), "{bad}: {message}");
        }
        assert!(AllowList::parse(Vec::<String>::new()).unwrap().is_empty());
    }
}
