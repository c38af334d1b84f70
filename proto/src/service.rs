//! Services: the ports an app serves and the virtual address (VIP) through
//! which other instances reach it, balanced over its ready instances.
//!
//! An app's `ports` (in the brain's app spec) list what its instances
//! listen on; each may be TCP (the default) or UDP, and may be *published*
//! on every node under another port (north-south). The brain gives each app
//! with ports one VIP from its `[network] vip_range` and tells every cell,
//! as a [`Service`], which instances are ready; a connection to `VIP:port`
//! goes to one of them at `backend:port` (the service port is the port the
//! instances listen on).

use crate::ids::{AppId, TenantId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

/// Most ports one app may serve (the same bound as an instance's ports).
pub const MAX_SERVICE_PORTS: usize = crate::instance::MAX_PORTS;
/// Most backends one service lists (the data plane's per-service maximum).
pub const MAX_SERVICE_BACKENDS: usize = 256;

/// The transport of a service port.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Tcp,
    Udp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One port an app serves. In JSON either a bare number (`8080`: TCP, not
/// published) or `{"port": 8080, "protocol": "udp", "published": 30080}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Transport,
    /// The port on every node's address that reaches this service from
    /// outside the cluster, if any.
    pub published: Option<u16>,
}

impl PortSpec {
    pub fn tcp(port: u16) -> Self {
        Self {
            port,
            protocol: Transport::Tcp,
            published: None,
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)?;
        if let Some(p) = self.published {
            write!(f, " (published {p})")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            port: u16,
            #[serde(default)]
            protocol: Transport,
            #[serde(default)]
            published: Option<u16>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Bare(u16),
            Full(Full),
        }
        // postcard is not self-describing: the wire carries the full form.
        if !d.is_human_readable() {
            let f = Full::deserialize(d)?;
            return Ok(Self {
                port: f.port,
                protocol: f.protocol,
                published: f.published,
            });
        }
        match Either::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "a port is a number or {\"port\": N, \"protocol\": \"tcp\"|\"udp\", \"published\": N}",
            )
        })? {
            Either::Bare(port) => Ok(Self::tcp(port)),
            Either::Full(f) => Ok(Self {
                port: f.port,
                protocol: f.protocol,
                published: f.published,
            }),
        }
    }
}

/// Every problem with a list of ports, at once: zero ports, a port (or a
/// published port) listed twice for one protocol, too many.
pub fn check_ports(ports: &[PortSpec]) -> Vec<String> {
    let mut p = Vec::new();
    if ports.len() > MAX_SERVICE_PORTS {
        p.push(format!(
            "{} ports, more than {MAX_SERVICE_PORTS}",
            ports.len()
        ));
    }
    let mut seen = BTreeSet::new();
    let mut published = BTreeSet::new();
    for s in ports {
        if s.port == 0 {
            p.push("port 0 is not a port".to_owned());
        } else if !seen.insert((s.port, s.protocol)) {
            p.push(format!("port {}/{} listed twice", s.port, s.protocol));
        }
        match s.published {
            Some(0) => p.push(format!("port {}: published port 0 is not a port", s.port)),
            Some(n) if !published.insert((n, s.protocol)) => {
                p.push(format!("published port {n}/{} listed twice", s.protocol))
            }
            _ => {}
        }
    }
    p
}

/// The distinct port numbers of `ports`, as an instance's spec lists them.
pub fn port_numbers(ports: &[PortSpec]) -> Vec<u16> {
    let set: BTreeSet<u16> = ports.iter().map(|p| p.port).collect();
    set.into_iter().collect()
}

/// An app's service as every cell's data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub vip: Ipv4Addr,
    pub tenant: TenantId,
    pub app: AppId,
    #[serde(deserialize_with = "crate::wire::serde_util::capped_vec")]
    pub ports: Vec<PortSpec>,
    /// The addresses of the app's ready instances, anywhere in the cluster,
    /// sorted; each listens on every port of `ports`.
    #[serde(deserialize_with = "crate::wire::serde_util::capped_vec")]
    pub backends: Vec<Ipv4Addr>,
}

impl Service {
    /// Every problem, at once (what a cell checks before programming it).
    pub fn check(&self) -> Vec<String> {
        let mut p = check_ports(&self.ports);
        if self.backends.len() > MAX_SERVICE_BACKENDS {
            p.push(format!(
                "{} backends, more than {MAX_SERVICE_BACKENDS}",
                self.backends.len()
            ));
        }
        if self.vip.is_unspecified() || self.vip.is_broadcast() || self.vip.is_multicast() {
            p.push(format!("{} cannot be a service address", self.vip));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_read_as_numbers_or_objects() {
        let ports: Vec<PortSpec> = serde_json::from_str(
            r#"[8080, {"port": 53, "protocol": "udp"}, {"port": 80, "published": 30080}]"#,
        )
        .unwrap();
        assert_eq!(
            ports,
            vec![
                PortSpec::tcp(8080),
                PortSpec {
                    port: 53,
                    protocol: Transport::Udp,
                    published: None
                },
                PortSpec {
                    port: 80,
                    protocol: Transport::Tcp,
                    published: Some(30080)
                },
            ]
        );
        assert!(check_ports(&ports).is_empty());
        assert_eq!(port_numbers(&ports), vec![53, 80, 8080]);
    }

    #[test]
    fn bad_ports_are_refused_with_every_problem() {
        let err = serde_json::from_str::<Vec<PortSpec>>(r#"[{"port": 1, "proto": "tcp"}]"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a port is a number or"), "{err}");
        let ports: Vec<PortSpec> = serde_json::from_str(
            r#"[0, 80, 80, {"port": 80, "protocol": "udp"},
                {"port": 81, "published": 9000}, {"port": 82, "published": 9000},
                {"port": 83, "published": 0}]"#,
        )
        .unwrap();
        let p = check_ports(&ports);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p.iter().any(|m| m.contains("port 0")));
        assert!(p.iter().any(|m| m.contains("80/tcp listed twice")));
        assert!(p.iter().any(|m| m.contains("published port 9000/tcp")));
        assert!(p.iter().any(|m| m.contains("83: published port 0")));
    }

    #[test]
    fn a_service_is_checked() {
        let s = Service {
            vip: Ipv4Addr::UNSPECIFIED,
            tenant: TenantId::new("acme").unwrap(),
            app: AppId::new("web").unwrap(),
            ports: vec![PortSpec::tcp(80)],
            backends: vec![Ipv4Addr::new(10, 0, 0, 1); MAX_SERVICE_BACKENDS + 1],
        };
        assert_eq!(s.check().len(), 2);
    }
}
