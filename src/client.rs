//! Who a client is, for budgets and connection shares.
//!
//! Contract: a token the cluster's keys verified is its pod ([`ClientKey::Pod`]), wherever it
//! comes from. Anything else is its source address, with every host-local source folded into
//! one client, [`ClientKey::Host`]: loopback (127/8, ::1), the agent's own listen addresses and
//! every address of the node's interfaces. A source address is not an identity: any process in
//! the host's network namespace (every hostNetwork pod) can bind any of those and connect from
//! it, so counting them apart would let one process pose as millions of clients. IPv4-mapped
//! IPv6 counts as IPv4, and IPv6 sources can be aggregated by prefix (`--client-ipv6-prefix`,
//! default 128: none), for clusters where one pod may hold many addresses. The node's addresses
//! are read at start and again every [`NODE_ADDRESSES_EVERY`].

use crate::token::PodKey;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::RwLock;
use std::time::Duration;

/// How often the node's own addresses are read again.
pub const NODE_ADDRESSES_EVERY: Duration = Duration::from_secs(60);

/// One client, as budgets and connection shares count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A pod, by its verified token.
    Pod(PodKey),
    /// Every host-local source.
    Host,
    /// A source address (IPv6 masked to the configured prefix).
    Source(IpAddr),
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Pod(k) => write!(f, "pod {k}"),
            ClientKey::Host => f.write_str("host"),
            ClientKey::Source(ip) => write!(f, "{ip}"),
        }
    }
}

/// Classifies source addresses.
pub struct Clients {
    /// The agent's listen addresses and the node's interface addresses.
    host: RwLock<HashSet<IpAddr>>,
    /// The agent's listen addresses, kept across re-reads of the node's.
    bound: Vec<IpAddr>,
    ipv6_prefix: u8,
}

impl Clients {
    pub fn new(bound: &[IpAddr], ipv6_prefix: u8) -> Clients {
        let clients = Clients {
            host: RwLock::default(),
            bound: bound.iter().map(|ip| ip.to_canonical()).collect(),
            ipv6_prefix: ipv6_prefix.min(128),
        };
        clients.read_node_addresses();
        clients
    }

    /// The client a connection from `ip` is, before any token says more.
    pub fn source(&self, ip: IpAddr) -> ClientKey {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            return ClientKey::Host;
        }
        let host = match self.host.read() {
            Ok(h) => h.contains(&ip),
            Err(p) => p.into_inner().contains(&ip),
        };
        if host {
            return ClientKey::Host;
        }
        match ip {
            IpAddr::V6(v6) if self.ipv6_prefix < 128 => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.ipv6_prefix))
                    .unwrap_or(0);
                ClientKey::Source(IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)))
            }
            _ => ClientKey::Source(ip),
        }
    }

    /// Read the node's interface addresses again (a blocking system call: cheap, but call it
    /// off the request path).
    pub fn read_node_addresses(&self) {
        let mut set: HashSet<IpAddr> = self.bound.iter().copied().collect();
        set.extend(node_addresses());
        match self.host.write() {
            Ok(mut h) => *h = set,
            Err(p) => *p.into_inner() = set,
        }
    }
}

#[cfg(target_os = "linux")]
fn node_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            a.as_sockaddr_in6()
                .map(|v6| IpAddr::V6(v6.ip()).to_canonical())
        })
        .collect()
}

#[cfg(not(target_os = "linux"))]
fn node_addresses() -> Vec<IpAddr> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn every_host_local_source_is_one_client() {
        let c = Clients::new(&[ip("169.254.170.23"), ip("fd00:ec2::23")], 128);
        for local in [
            "127.0.0.1",
            "127.0.3.9",
            "::1",
            "169.254.170.23",
            "fd00:ec2::23",
            "::ffff:127.0.0.5",
        ] {
            assert_eq!(c.source(ip(local)), ClientKey::Host, "{local}");
        }
        // This machine's own interface addresses are the host too.
        for a in node_addresses() {
            assert_eq!(c.source(a), ClientKey::Host, "{a}");
        }
        assert_eq!(
            c.source(ip("10.0.3.17")),
            ClientKey::Source(ip("10.0.3.17"))
        );
        assert_eq!(
            c.source(ip("::ffff:10.0.3.17")),
            ClientKey::Source(ip("10.0.3.17"))
        );
    }

    #[test]
    fn ipv6_sources_aggregate_by_prefix() {
        let c = Clients::new(&[], 80);
        assert_eq!(
            c.source(ip("2600:1f14:1:2:3:4:5:6")),
            c.source(ip("2600:1f14:1:2:3:ffff:ffff:ffff"))
        );
        assert_ne!(
            c.source(ip("2600:1f14:1:2:3:4:5:6")),
            c.source(ip("2600:1f14:1:2:4:4:5:6"))
        );
        let none = Clients::new(&[], 128);
        assert_ne!(
            none.source(ip("2600:1f14::1")),
            none.source(ip("2600:1f14::2"))
        );
    }
}
