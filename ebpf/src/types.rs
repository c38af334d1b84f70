//! The typed view of the maps: numbers, directions, policies, counters.
//! Pure conversions to and from the raw structs of [`crate::abi`].

use std::fmt;
use std::iter::Sum;
use std::net::Ipv4Addr;
use std::num::NonZeroU32;
use std::ops::{Add, AddAssign};

use crate::abi::{self, c};
use crate::Error;

/// The data-plane number of a tenant, assigned by the control plane.
/// 0 is reserved ("unknown").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantNum(NonZeroU32);

/// The data-plane number of an app, assigned by the control plane.
/// 0 is reserved ("unknown").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppNum(NonZeroU32);

/// The data-plane number of an instance, assigned by the control plane.
/// 0 is reserved ("unknown").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceNum(NonZeroU32);

macro_rules! number {
    ($ty:ident) => {
        impl $ty {
            /// `None` for the reserved 0.
            pub const fn new(n: u32) -> Option<Self> {
                match NonZeroU32::new(n) {
                    Some(n) => Some(Self(n)),
                    None => None,
                }
            }

            pub const fn get(self) -> u32 {
                self.0.get()
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
number!(TenantNum);
number!(InstanceNum);
number!(AppNum);

/// Which way a packet went, seen from the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Sent by the instance (TC ingress of the host-side veth).
    FromInstance,
    /// Delivered to the instance (TC egress of the host-side veth).
    ToInstance,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::FromInstance, Direction::ToInstance];

    pub const fn raw(self) -> u32 {
        match self {
            Direction::FromInstance => c::CORRAL_DIR_FROM_INSTANCE,
            Direction::ToInstance => c::CORRAL_DIR_TO_INSTANCE,
        }
    }

    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.raw() == raw)
    }

    /// A stable label (for metrics).
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::FromInstance => "from_instance",
            Direction::ToInstance => "to_instance",
        }
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// IPv4 source (or ARP sender) is not the instance's address.
    Spoof,
    /// Cross-tenant traffic that no policy allows and that is not the reply
    /// of a flow a policy allowed.
    Policy,
    /// The interface has no entry in `ifaces`; counted under tenant 0.
    UnknownInterface,
    /// IPv6 is not supported yet.
    Ipv6,
    /// Any other ethertype (VLAN tags, non-IPv4 ARP, ...).
    Unsupported,
    /// Truncated or invalid headers.
    Malformed,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::Spoof,
        DropReason::Policy,
        DropReason::UnknownInterface,
        DropReason::Ipv6,
        DropReason::Unsupported,
        DropReason::Malformed,
    ];

    pub const fn raw(self) -> u32 {
        match self {
            DropReason::Spoof => c::CORRAL_DROP_SPOOF,
            DropReason::Policy => c::CORRAL_DROP_POLICY,
            DropReason::UnknownInterface => c::CORRAL_DROP_UNKNOWN_IFACE,
            DropReason::Ipv6 => c::CORRAL_DROP_IPV6,
            DropReason::Unsupported => c::CORRAL_DROP_UNSUPPORTED,
            DropReason::Malformed => c::CORRAL_DROP_MALFORMED,
        }
    }

    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.raw() == raw)
    }

    /// A stable label (for metrics).
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Spoof => "spoof",
            DropReason::Policy => "policy",
            DropReason::UnknownInterface => "unknown_interface",
            DropReason::Ipv6 => "ipv6",
            DropReason::Unsupported => "unsupported",
            DropReason::Malformed => "malformed",
        }
    }
}

/// The instance behind a host-side veth (a value of `ifaces`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InstanceIface {
    /// The only source address the instance may use.
    pub addr: Ipv4Addr,
    pub tenant: TenantNum,
    pub instance: InstanceNum,
    pub app: AppNum,
}

impl InstanceIface {
    /// The entry of the veth `ifindex`.
    pub fn to_raw(&self, ifindex: u32) -> abi::Iface {
        abi::Iface {
            ifindex,
            addr: abi::ipv4_to_raw(self.addr),
            tenant: self.tenant.get(),
            instance: self.instance.get(),
            app: self.app.get(),
        }
    }

    /// `None` if the entry carries a reserved 0 (a free slot, or not
    /// written by this crate).
    pub fn from_raw(raw: &abi::Iface) -> Option<Self> {
        if raw.ifindex == 0 {
            return None;
        }
        Some(Self {
            addr: abi::ipv4_from_raw(raw.addr),
            tenant: TenantNum::new(raw.tenant)?,
            instance: InstanceNum::new(raw.instance)?,
            app: AppNum::new(raw.app)?,
        })
    }
}

/// The owner of an instance address anywhere in the cluster (a value of
/// `endpoints`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub tenant: TenantNum,
    pub instance: InstanceNum,
    pub app: AppNum,
}

impl Endpoint {
    pub fn to_raw(&self) -> abi::Endpoint {
        abi::Endpoint {
            tenant: self.tenant.get(),
            instance: self.instance.get(),
            app: self.app.get(),
        }
    }

    pub fn from_raw(raw: &abi::Endpoint) -> Option<Self> {
        Some(Self {
            tenant: TenantNum::new(raw.tenant)?,
            instance: InstanceNum::new(raw.instance)?,
            app: AppNum::new(raw.app)?,
        })
    }
}

/// The protocol a policy covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// Every protocol (the policy's port must then be 0).
    Any,
    Icmp,
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The `IPPROTO_*` number (0 for [`Protocol::Any`]).
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Any => 0,
            Protocol::Icmp => 1,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        [Self::Any, Self::Icmp, Self::Tcp, Self::Udp, Self::Sctp]
            .into_iter()
            .find(|p| p.number() == n)
    }

    const fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Any => "any",
            Protocol::Icmp => "icmp",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

/// Allows instances of tenant `from` to send to instances of tenant `to`
/// (and, through conntrack, the replies to such traffic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Policy {
    pub from: TenantNum,
    pub to: TenantNum,
    /// Only this app of `to`; `None`: every app of `to`.
    pub app: Option<AppNum>,
    pub protocol: Protocol,
    /// Destination port; 0 = any port.
    pub port: u16,
}

impl Policy {
    /// Checks the policy and turns it into a map key.
    pub fn to_key(&self) -> Result<abi::PolicyKey, Error> {
        let invalid = |reason: String| Err(Error::InvalidPolicy { reason });
        if self.from == self.to {
            return invalid(format!(
                "a policy from tenant {} to itself changes nothing: traffic within a tenant is always allowed",
                self.from
            ));
        }
        if self.port != 0 && !self.protocol.has_ports() {
            return invalid(format!(
                "port {} needs protocol tcp, udp or sctp, not {}",
                self.port, self.protocol
            ));
        }
        Ok(abi::PolicyKey {
            from_tenant: self.from.get(),
            to_tenant: self.to.get(),
            to_app: self.app.map_or(0, AppNum::get),
            port: self.port,
            proto: self.protocol.number(),
            pad: 0,
        })
    }

    /// `None` for keys this crate would not have written.
    pub fn from_key(key: &abi::PolicyKey) -> Option<Self> {
        Some(Self {
            from: TenantNum::new(key.from_tenant)?,
            to: TenantNum::new(key.to_tenant)?,
            app: AppNum::new(key.to_app),
            protocol: Protocol::from_number(key.proto)?,
            port: key.port,
        })
    }
}

impl Policy {
    /// The `CORRAL_RULE_*` bit of this policy's kind of key (see
    /// `policy_pairs` in the crate docs).
    pub fn kind(&self) -> u32 {
        match (self.app.is_some(), self.protocol, self.port) {
            (true, Protocol::Any, _) => c::CORRAL_RULE_APP_ANY,
            (true, _, 0) => c::CORRAL_RULE_APP_PROTO,
            (true, _, _) => c::CORRAL_RULE_APP_PORT,
            (false, Protocol::Any, _) => c::CORRAL_RULE_ANY,
            (false, _, 0) => c::CORRAL_RULE_PROTO,
            (false, _, _) => c::CORRAL_RULE_PORT,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tenant {} -> tenant {}", self.from, self.to)?;
        if let Some(app) = self.app {
            write!(f, " app {app}")?;
        }
        write!(f, " {}", self.protocol)?;
        if self.port != 0 {
            write!(f, "/{}", self.port)?;
        }
        Ok(())
    }
}

/// Packets and bytes (the sum over CPUs of a per-CPU counter).
pub type Counter = abi::Counter;

impl Add for Counter {
    type Output = Counter;

    fn add(self, other: Counter) -> Counter {
        Counter {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

impl AddAssign for Counter {
    fn add_assign(&mut self, other: Counter) {
        *self = *self + other;
    }
}

impl Sum for Counter {
    fn sum<I: Iterator<Item = Counter>>(iter: I) -> Counter {
        iter.fold(Counter::default(), Add::add)
    }
}

impl<'a> Sum<&'a Counter> for Counter {
    fn sum<I: Iterator<Item = &'a Counter>>(iter: I) -> Counter {
        iter.copied().sum()
    }
}

/// Every non-zero counter of the data plane, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Traffic that passed, per tenant.
    pub tenants: Vec<(TenantNum, Direction, Counter)>,
    /// Traffic that passed, per instance.
    pub instances: Vec<(InstanceNum, Direction, Counter)>,
    /// Dropped traffic, per tenant (`None`: unknown interface) and reason.
    pub drops: Vec<(Option<TenantNum>, DropReason, Counter)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(n: u32) -> TenantNum {
        TenantNum::new(n).unwrap()
    }

    #[test]
    fn zero_is_reserved() {
        assert_eq!(TenantNum::new(0), None);
        assert_eq!(InstanceNum::new(0), None);
        assert_eq!(TenantNum::new(7).map(TenantNum::get), Some(7));
    }

    #[test]
    fn raw_enums_round_trip_and_match_the_header() {
        for d in Direction::ALL {
            assert_eq!(Direction::from_raw(d.raw()), Some(d));
        }
        for r in DropReason::ALL {
            assert_eq!(DropReason::from_raw(r.raw()), Some(r));
        }
        assert_eq!(DropReason::from_raw(0), None);
        assert_eq!(Direction::ToInstance.raw(), 1);
        assert_eq!(DropReason::Spoof.raw(), 1);
    }

    #[test]
    fn policy_keys_round_trip() {
        let p = Policy {
            from: tenant(1),
            to: tenant(2),
            app: None,
            protocol: Protocol::Tcp,
            port: 8080,
        };
        let key = p.to_key().unwrap();
        assert_eq!(
            (
                key.from_tenant,
                key.to_tenant,
                key.to_app,
                key.proto,
                key.port,
                key.pad
            ),
            (1, 2, 0, 6, 8080, 0)
        );
        assert_eq!(Policy::from_key(&key), Some(p));
        assert_eq!(p.kind(), c::CORRAL_RULE_PORT);
        let one_app = Policy {
            app: AppNum::new(9),
            ..p
        };
        assert_eq!(one_app.to_key().unwrap().to_app, 9);
        assert_eq!(Policy::from_key(&one_app.to_key().unwrap()), Some(one_app));
        assert_eq!(one_app.kind(), c::CORRAL_RULE_APP_PORT);
        let any = Policy {
            protocol: Protocol::Any,
            port: 0,
            ..p
        };
        assert_eq!(Policy::from_key(&any.to_key().unwrap()), Some(any));
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        let p = Policy {
            from: tenant(1),
            to: tenant(2),
            app: None,
            protocol: Protocol::Icmp,
            port: 80,
        };
        let err = p.to_key().unwrap_err().to_string();
        assert!(
            err.contains("port 80 needs protocol tcp, udp or sctp"),
            "{err}"
        );
        let same = Policy {
            to: tenant(1),
            protocol: Protocol::Tcp,
            ..p
        };
        assert!(same.to_key().unwrap_err().to_string().contains("to itself"));
    }

    #[test]
    fn counters_sum_over_cpus() {
        let per_cpu = [
            Counter {
                packets: 2,
                bytes: 100,
            },
            Counter {
                packets: 0,
                bytes: 0,
            },
            Counter {
                packets: 3,
                bytes: 42,
            },
        ];
        assert_eq!(
            per_cpu.iter().sum::<Counter>(),
            Counter {
                packets: 5,
                bytes: 142
            }
        );
    }

    #[test]
    fn raw_values_with_reserved_numbers_are_not_trusted() {
        let raw = abi::Iface {
            ifindex: 7,
            addr: abi::ipv4_to_raw(Ipv4Addr::new(10, 0, 0, 2)),
            tenant: 0,
            instance: 3,
            app: 5,
        };
        assert_eq!(InstanceIface::from_raw(&raw), None);
        let ok = abi::Iface { tenant: 4, ..raw };
        let iface = InstanceIface::from_raw(&ok).unwrap();
        assert_eq!(iface.addr, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(iface.to_raw(7), ok);
        // A free slot.
        assert_eq!(
            InstanceIface::from_raw(&abi::Iface { ifindex: 0, ..ok }),
            None
        );
    }
}
