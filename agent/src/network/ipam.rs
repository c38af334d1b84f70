//! Address management for a cell's instance subnet. Pure: the agent feeds
//! it what exists (at start-up, from its records) and asks for addresses.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network in CIDR form with its host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    base: u32,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("subnet {0:?} is not an IPv4 CIDR such as 10.244.1.0/24")]
    Syntax(String),
    #[error("subnet {0} has host bits set; did you mean {1}?")]
    HostBits(String, Subnet),
    #[error("subnet {0} is too small: at least a /29 is needed (6 addresses)")]
    TooSmall(Subnet),
    #[error("subnet {0} is too large: at most a /8")]
    TooLarge(Subnet),
    #[error("subnet {subnet} overlaps the node's network {other}")]
    Overlap { subnet: Subnet, other: Subnet },
    #[error("address {0} is outside subnet {1}")]
    Outside(Ipv4Addr, Subnet),
    #[error("address {0} is already in use")]
    InUse(Ipv4Addr),
    #[error("subnet {0} has no free address")]
    Exhausted(Subnet),
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, IpamError> {
        let base = u32::from(addr);
        let s = Subnet {
            base: base & mask(prefix),
            prefix,
        };
        if base & !mask(prefix) != 0 {
            return Err(IpamError::HostBits(format!("{addr}/{prefix}"), s));
        }
        if prefix > 29 {
            return Err(IpamError::TooSmall(s));
        }
        if prefix < 8 {
            return Err(IpamError::TooLarge(s));
        }
        Ok(s)
    }

    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(self.base)
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    pub fn contains(self, a: Ipv4Addr) -> bool {
        u32::from(a) & mask(self.prefix) == self.base
    }

    pub fn overlaps(self, o: Subnet) -> bool {
        let m = mask(self.prefix.min(o.prefix));
        self.base & m == o.base & m
    }

    fn last(self) -> u32 {
        self.base | !mask(self.prefix)
    }

    /// The node's own address in the subnet (the first host address).
    pub fn node_address(self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = IpamError;
    fn from_str(s: &str) -> Result<Self, IpamError> {
        let bad = || IpamError::Syntax(s.to_owned());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
        Subnet::new(addr, prefix)
    }
}

/// Checks a cell subnet against the networks the node already has (its
/// interfaces' addresses with their prefixes).
pub fn check_no_overlap(subnet: Subnet, node: &[(Ipv4Addr, u8)]) -> Result<(), IpamError> {
    for (a, p) in node {
        let other = Subnet {
            base: u32::from(*a) & mask(*p),
            prefix: *p,
        };
        // Host routes (/32) of our own instances are not the node's networks.
        if *p < 32 && subnet.overlaps(other) {
            return Err(IpamError::Overlap { subnet, other });
        }
    }
    Ok(())
}

/// Allocates instance addresses: the network, node (first host) and
/// broadcast addresses are never handed out; allocation is next-fit so that a
/// just-released address is not reused at once (stale peers and connection
/// tracking entries age out first).
#[derive(Debug, Clone)]
pub struct Ipam {
    subnet: Subnet,
    used: BTreeSet<u32>,
    cursor: u32,
}

impl Ipam {
    pub fn new(subnet: Subnet) -> Self {
        Self {
            subnet,
            used: BTreeSet::new(),
            cursor: subnet.base + 2,
        }
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    fn first(&self) -> u32 {
        self.subnet.base + 2
    }

    fn last(&self) -> u32 {
        self.subnet.last() - 1
    }

    /// Marks an address as used (re-adoption); refuses collisions.
    pub fn reserve(&mut self, a: Ipv4Addr) -> Result<(), IpamError> {
        let n = u32::from(a);
        if !self.subnet.contains(a) || n < self.first() || n > self.last() {
            return Err(IpamError::Outside(a, self.subnet));
        }
        if !self.used.insert(n) {
            return Err(IpamError::InUse(a));
        }
        Ok(())
    }

    pub fn allocate(&mut self) -> Result<Ipv4Addr, IpamError> {
        let (first, last) = (self.first(), self.last());
        let span = last - first + 1;
        for i in 0..span {
            let n = first + (self.cursor - first + i) % span;
            if self.used.insert(n) {
                self.cursor = if n == last { first } else { n + 1 };
                return Ok(Ipv4Addr::from(n));
            }
        }
        Err(IpamError::Exhausted(self.subnet))
    }

    pub fn release(&mut self, a: Ipv4Addr) {
        self.used.remove(&u32::from(a));
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parsing_and_validation() {
        let s: Subnet = "10.244.1.0/24".parse().unwrap();
        assert_eq!(s.to_string(), "10.244.1.0/24");
        assert_eq!(s.node_address(), Ipv4Addr::new(10, 244, 1, 1));
        assert!(matches!(
            "10.244.1.5/24".parse::<Subnet>(),
            Err(IpamError::HostBits(..))
        ));
        assert!(matches!(
            "10.0.0.0/30".parse::<Subnet>(),
            Err(IpamError::TooSmall(_))
        ));
        assert!(matches!(
            "16.0.0.0/4".parse::<Subnet>(),
            Err(IpamError::TooLarge(_))
        ));
        for bad in ["", "10.0.0.0", "10.0.0.0/33", "x/24", "10.0.0/24"] {
            assert!(
                matches!(bad.parse::<Subnet>(), Err(IpamError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn overlap_with_node_networks_is_refused() {
        let s: Subnet = "10.244.1.0/24".parse().unwrap();
        assert!(check_no_overlap(s, &[(Ipv4Addr::new(192, 168, 1, 10), 24)]).is_ok());
        assert!(check_no_overlap(s, &[(Ipv4Addr::new(10, 244, 1, 7), 32)]).is_ok());
        let e = check_no_overlap(s, &[(Ipv4Addr::new(10, 0, 0, 1), 8)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnet 10.244.1.0/24 overlaps the node's network 10.0.0.0/8"
        );
    }

    #[test]
    fn allocation_skips_reserved_and_wraps_next_fit() {
        let mut ipam = Ipam::new("10.1.0.0/29".parse().unwrap());
        // .0 network, .1 node, .7 broadcast: .2 ..= .6 usable.
        let got: Vec<_> = (0..5)
            .map(|_| ipam.allocate().unwrap().octets()[3])
            .collect();
        assert_eq!(got, [2, 3, 4, 5, 6]);
        assert!(matches!(ipam.allocate(), Err(IpamError::Exhausted(_))));
        ipam.release(Ipv4Addr::new(10, 1, 0, 3));
        ipam.release(Ipv4Addr::new(10, 1, 0, 5));
        assert_eq!(ipam.allocate().unwrap(), Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(ipam.allocate().unwrap(), Ipv4Addr::new(10, 1, 0, 5));
    }

    #[test]
    fn reserve_refuses_collisions_and_strangers() {
        let mut ipam = Ipam::new("10.1.0.0/24".parse().unwrap());
        ipam.reserve(Ipv4Addr::new(10, 1, 0, 9)).unwrap();
        assert!(matches!(
            ipam.reserve(Ipv4Addr::new(10, 1, 0, 9)),
            Err(IpamError::InUse(_))
        ));
        assert!(matches!(
            ipam.reserve(Ipv4Addr::new(10, 1, 0, 1)),
            Err(IpamError::Outside(..))
        ));
        assert!(matches!(
            ipam.reserve(Ipv4Addr::new(10, 2, 0, 9)),
            Err(IpamError::Outside(..))
        ));
    }

    proptest! {
        #[test]
        fn never_hands_out_an_address_twice(ops in proptest::collection::vec(any::<(bool, u8)>(), 0..300)) {
            let subnet: Subnet = "10.9.0.0/26".parse().unwrap();
            let mut ipam = Ipam::new(subnet);
            let mut held: Vec<Ipv4Addr> = Vec::new();
            for (alloc, pick) in ops {
                if alloc || held.is_empty() {
                    if let Ok(a) = ipam.allocate() {
                        prop_assert!(!held.contains(&a));
                        prop_assert!(subnet.contains(a) && a != subnet.node_address() && a != subnet.network());
                        held.push(a);
                    } else {
                        prop_assert_eq!(held.len(), 61);
                    }
                } else {
                    let a = held.swap_remove(pick as usize % held.len());
                    ipam.release(a);
                }
                prop_assert_eq!(ipam.in_use(), held.len());
            }
        }
    }
}
