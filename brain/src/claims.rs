//! What only one app of the whole cluster may hold: its virtual IP (VIP)
//! and each port it publishes on every node. Pure: which claims an app
//! needs, and which VIP of a range is the lowest free one.
//!
//! The store keeps every claim as its own record, written in the same
//! commit as the app that holds it and created only if absent, so two
//! concurrent creates can never hold the same VIP or published port (the
//! loser's commit fails and it chooses again).

use crate::desired::{App, AppKey};
use corral_proto::service::Transport;
use corral_proto::wire::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

/// A cluster-wide resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Claim {
    /// The app's service address.
    Vip { vip: Ipv4Addr },
    /// A port published on every node's address.
    Published { port: u16, protocol: Transport },
}

impl Claim {
    /// The claim's key in the store: unique per claim, and every VIP
    /// claim starts with `vip/`.
    pub fn key(&self) -> String {
        match self {
            Self::Vip { vip } => format!("vip/{vip}"),
            Self::Published { port, protocol } => format!("published/{protocol}/{port}"),
        }
    }
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vip { vip } => write!(f, "VIP {vip}"),
            Self::Published { port, protocol } => write!(f, "published port {port}/{protocol}"),
        }
    }
}

/// A claim as the store keeps it: who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub claim: Claim,
    pub app: AppKey,
    #[serde(default)]
    pub revision: u64,
}

/// Everything `app` holds cluster-wide: its VIP, if it has one, and its
/// published ports.
pub fn claims_of(app: &App) -> BTreeSet<Claim> {
    let mut c: BTreeSet<Claim> = app
        .ports
        .iter()
        .filter_map(|p| {
            p.published.map(|port| Claim::Published {
                port,
                protocol: p.protocol,
            })
        })
        .collect();
    if let Some(vip) = app.vip {
        c.insert(Claim::Vip { vip });
    }
    c
}

/// The first and last address of `range` an app may get: never the
/// network or the broadcast address. `None` for a range without such
/// addresses (/31, /32; the config refuses them).
fn hosts(range: Ipv4Net) -> Option<(u32, u32)> {
    if range.prefix() > 30 {
        return None;
    }
    let network = u32::from(range.addr());
    let size = 1u64 << (32 - u32::from(range.prefix()));
    let broadcast = u32::try_from(u64::from(network) + size - 1).ok()?;
    Some((network + 1, broadcast - 1))
}

/// How many VIPs `range` holds.
pub fn vip_count(range: Ipv4Net) -> u64 {
    hosts(range).map_or(0, |(lo, hi)| u64::from(hi - lo) + 1)
}

/// The lowest address of `range` that is neither its network nor its
/// broadcast address nor in `used`; `None` when every one is taken.
/// Costs at most `used.len() + 1` steps.
pub fn lowest_free_vip(range: Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let (lo, hi) = hosts(range)?;
    let mut next = lo;
    for u in used.range(Ipv4Addr::from(lo)..=Ipv4Addr::from(hi)) {
        let u = u32::from(*u);
        if u > next {
            break;
        }
        next = u.checked_add(1)?;
    }
    (next <= hi).then(|| Ipv4Addr::from(next))
}

/// How many VIPs of `range` are not in `used`.
pub fn free_vips<'a>(range: Ipv4Net, used: impl IntoIterator<Item = &'a Ipv4Addr>) -> u64 {
    let Some((lo, hi)) = hosts(range) else {
        return 0;
    };
    let taken: BTreeSet<u32> = used
        .into_iter()
        .map(|a| u32::from(*a))
        .filter(|a| (lo..=hi).contains(a))
        .collect();
    vip_count(range).saturating_sub(taken.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ips(list: &[&str]) -> BTreeSet<Ipv4Addr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_lowest_free_host_address_is_chosen() {
        let r = net("10.96.0.0/29");
        assert_eq!(vip_count(r), 6);
        assert_eq!(
            lowest_free_vip(r, &ips(&[])),
            Some("10.96.0.1".parse().unwrap())
        );
        assert_eq!(
            lowest_free_vip(r, &ips(&["10.96.0.1", "10.96.0.2", "10.96.0.4"])),
            Some("10.96.0.3".parse().unwrap()),
            "a released address is used again first"
        );
        // Addresses outside the range (an older vip_range) do not count.
        assert_eq!(
            lowest_free_vip(r, &ips(&["10.0.0.1", "10.96.0.1", "10.200.0.0"])),
            Some("10.96.0.2".parse().unwrap())
        );
        assert_eq!(
            free_vips(r, &ips(&["10.0.0.1", "10.96.0.1", "10.96.0.6"])),
            4
        );
    }

    #[test]
    fn network_and_broadcast_are_never_given_and_a_full_range_is_none() {
        let r = net("192.168.7.0/30");
        let all = ips(&["192.168.7.1", "192.168.7.2"]);
        assert_eq!(vip_count(r), 2);
        assert_eq!(lowest_free_vip(r, &all), None);
        assert_eq!(free_vips(r, &all), 0);
        let mut got = BTreeSet::new();
        while let Some(ip) = lowest_free_vip(r, &got) {
            got.insert(ip);
        }
        assert_eq!(got, all);
        // The top of the address space.
        let top = net("255.255.255.252/30");
        assert_eq!(
            lowest_free_vip(top, &ips(&["255.255.255.253"])),
            Some("255.255.255.254".parse().unwrap())
        );
        assert_eq!(vip_count(net("10.0.0.0/31")), 0);
        assert_eq!(vip_count(net("10.0.0.0/8")), (1 << 24) - 2);
    }

    #[test]
    fn claim_keys_are_distinct_and_vips_share_a_prefix() {
        let v = Claim::Vip {
            vip: "10.96.0.1".parse().unwrap(),
        };
        let t = Claim::Published {
            port: 30080,
            protocol: Transport::Tcp,
        };
        let u = Claim::Published {
            port: 30080,
            protocol: Transport::Udp,
        };
        assert_eq!(v.key(), "vip/10.96.0.1");
        assert_ne!(t.key(), u.key());
        assert_eq!(t.to_string(), "published port 30080/tcp");
    }
}
