//! Who may post callbacks: a source allow-list, with `X-Forwarded-For` honoured only when the
//! connection comes from a configured trusted proxy.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// An IP network: an address and a prefix length (`198.51.100.0/24`, `2001:db8::/32`, or a bare
/// address for one host). The matching is `ipnet`'s; the parsing stays ours so that an address
/// is read by `std` (no leading-zero octets, which some tools take for octal: `010.0.0.0/8`
/// is refused rather than guessed at) and the error says which half is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text.trim(), None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let host = IpNet::from(address);
        let prefix = match prefix {
            Some(prefix) => prefix.parse::<u8>().ok(),
            None => Some(host.max_prefix_len()),
        };
        prefix
            .and_then(|prefix| IpNet::new(address, prefix).ok())
            .map(Cidr)
            .ok_or_else(|| {
                format!(
                    "{text:?} has a prefix length outside 0..={}",
                    host.max_prefix_len()
                )
            })
    }
}

impl Cidr {
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = match (self.0, address) {
            // An IPv4 client seen through an IPv6 socket.
            (IpNet::V4(_), IpAddr::V6(v6)) => {
                v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(address)
            }
            _ => address,
        };
        self.0.contains(&address)
    }
}

/// The source rules for the callback port.
#[derive(Clone, Debug, Default)]
pub struct SourcePolicy {
    /// Empty: any source.
    allowed: Vec<Cidr>,
    /// Connections from these may name the client in `X-Forwarded-For`.
    trusted_proxies: Vec<Cidr>,
}

impl SourcePolicy {
    pub fn new(allowed: Vec<Cidr>, trusted_proxies: Vec<Cidr>) -> Self {
        Self {
            allowed,
            trusted_proxies,
        }
    }

    fn trusted(&self, address: IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .any(|proxy| proxy.contains(address))
    }

    /// The client's address: the peer, unless the peer is a trusted proxy, in which case the
    /// right-most `X-Forwarded-For` entry that is not itself a trusted proxy. An entry that does
    /// not parse stops the walk: what lies left of it cannot be trusted.
    pub fn client_address(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let Some(forwarded_for) = forwarded_for.filter(|_| self.trusted(peer)) else {
            return peer;
        };
        let mut client = peer;
        for entry in forwarded_for.rsplit(',') {
            match entry.trim().parse::<IpAddr>() {
                Ok(address) => {
                    client = address;
                    if !self.trusted(address) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }

    pub fn allows(&self, client: IpAddr) -> bool {
        self.allowed.is_empty() || self.allowed.iter().any(|network| network.contains(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses_only() {
        assert!(cidr("198.51.100.0/24").contains(ip("198.51.100.200")));
        assert!(!cidr("198.51.100.0/24").contains(ip("198.51.101.1")));
        assert!(cidr("10.0.0.7").contains(ip("10.0.0.7")));
        assert!(!cidr("10.0.0.7").contains(ip("10.0.0.8")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.1")));
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(cidr("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")));
        for bad in [
            "",
            "300.1.1.1/8",
            "10.0.0.0/33",
            "fe80::/129",
            "host.example",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv4_mapped_ipv6_clients_match_ipv4_networks_and_nothing_else_is_translated() {
        let network = cidr("198.51.100.0/24");
        assert!(network.contains(ip("::ffff:198.51.100.7")));
        assert!(!network.contains(ip("::ffff:198.51.101.7")));
        // The deprecated IPv4-compatible form is not a mapped address: not translated.
        assert!(!network.contains(ip("::198.51.100.7")));
        // An IPv6 network matches IPv6 addresses only, a mapped one written as such included.
        let mapped = cidr("::ffff:198.51.100.0/120");
        assert!(mapped.contains(ip("::ffff:198.51.100.7")));
        assert!(!mapped.contains(ip("198.51.100.7")));
        assert!(!cidr("::/0").contains(ip("198.51.100.7")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        // A bare mapped address is one host.
        assert!(cidr("::ffff:10.0.0.7").contains(ip("::ffff:10.0.0.7")));
        assert!(!cidr("::ffff:10.0.0.7").contains(ip("::ffff:10.0.0.8")));
    }

    #[test]
    fn host_bits_are_ignored_and_ambiguous_spellings_are_refused() {
        assert!(cidr("198.51.100.7/24").contains(ip("198.51.100.200")));
        assert!(cidr(" 10.0.0.0/8 ").contains(ip("10.200.0.1")));
        assert!(cidr("2001:db8::1/128").contains(ip("2001:db8::1")));
        assert!(!cidr("2001:db8::1/128").contains(ip("2001:db8::2")));
        for bad in [
            "010.0.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err("\"10.0.0.0/33\" has a prefix length outside 0..=32".to_owned())
        );
        assert_eq!(
            "fe80::/129".parse::<Cidr>(),
            Err("\"fe80::/129\" has a prefix length outside 0..=128".to_owned())
        );
        assert_eq!(
            "host.example".parse::<Cidr>(),
            Err("\"host.example\" is not an IP address or CIDR".to_owned())
        );
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_proxies() {
        let policy = SourcePolicy::new(vec![cidr("198.51.100.0/24")], vec![cidr("10.0.0.0/8")]);
        let proxy = ip("10.1.1.1");
        assert_eq!(
            policy.client_address(proxy, Some("198.51.100.7")),
            ip("198.51.100.7")
        );
        assert_eq!(
            policy.client_address(proxy, Some("6.6.6.6, 198.51.100.7, 10.2.2.2")),
            ip("198.51.100.7"),
            "the forged left part is ignored"
        );
        assert_eq!(
            policy.client_address(ip("203.0.113.5"), Some("198.51.100.7")),
            ip("203.0.113.5"),
            "untrusted peers cannot claim an address"
        );
        assert_eq!(
            policy.client_address(proxy, Some("garbage, 10.2.2.2")),
            ip("10.2.2.2")
        );
        assert!(policy.allows(ip("198.51.100.7")));
        assert!(!policy.allows(ip("203.0.113.5")));
        assert!(SourcePolicy::default().allows(ip("203.0.113.5")));
    }
}
