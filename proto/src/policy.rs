//! Network policies between tenants: what the brain's `/v1/policies` accepts,
//! what travels to every cell, and what each cell writes into its data
//! plane. Traffic within a tenant is always allowed; traffic between two
//! tenants' instances only where a policy allows it (and replies to it).

use crate::ids::{AppId, TenantId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Which protocol a policy opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Every protocol (the port must then be 0).
    Any,
    Icmp,
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Sctp)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::Icmp => "icmp",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn any() -> Protocol {
    Protocol::Any
}

/// Instances of tenant `from` may open flows to instances of tenant `to`
/// (of its app `app` only, if given) with `protocol` to destination `port`
/// (0: any port).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    pub from: TenantId,
    pub to: TenantId,
    /// Only this app of `to`; absent: every app of `to`. (Always
    /// serialized: the wire format has no optional fields.)
    #[serde(default)]
    pub app: Option<AppId>,
    #[serde(default = "any")]
    pub protocol: Protocol,
    #[serde(default)]
    pub port: u16,
}

impl PolicyRule {
    /// Every problem with the rule, at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.from == self.to {
            p.push(format!(
                "a policy from tenant {} to itself changes nothing: traffic within a tenant is always allowed",
                self.from
            ));
        }
        if self.port != 0 && !self.protocol.has_ports() {
            p.push(format!(
                "port {} needs protocol tcp, udp or sctp, not {}",
                self.port, self.protocol
            ));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }
}

impl fmt::Display for PolicyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.from, self.to)?;
        if let Some(app) = &self.app {
            write!(f, "/{app}")?;
        }
        write!(f, " {}", self.protocol)?;
        if self.port != 0 {
            write!(f, "/{}", self.port)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> Result<PolicyRule, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn defaults_and_validation() {
        let r = rule(r#"{"from":"globex","to":"acme"}"#).unwrap();
        assert_eq!(r.protocol, Protocol::Any);
        assert_eq!(r.port, 0);
        assert!(r.validate().is_ok());
        assert_eq!(r.to_string(), "globex -> acme any");

        let r = rule(r#"{"from":"a","to":"a","protocol":"icmp","port":80}"#).unwrap();
        let p = r.validate().unwrap_err();
        assert_eq!(p.len(), 2, "{p:?}");

        assert!(rule(r#"{"from":"a","to":"b","protocol":"gre"}"#).is_err());
        let r = rule(r#"{"from":"a","to":"b","app":"web","protocol":"tcp","port":80}"#).unwrap();
        assert_eq!(r.app.as_ref().map(AppId::as_str), Some("web"));
        assert_eq!(r.to_string(), "a -> b/web tcp/80");
        assert!(rule(r#"{"from":"a","to":"b","app":"Not An App!"}"#).is_err());
        assert!(rule(r#"{"from":"a","to":"b","tenant":"x"}"#).is_err());
        assert!(rule(r#"{"from":"a","to":"b","port":70000}"#).is_err());
        let r = rule(r#"{"from":"a","to":"b","protocol":"tcp","port":8080}"#).unwrap();
        assert!(r.validate().is_ok());
        assert_eq!(r.to_string(), "a -> b tcp/8080");
    }
}
