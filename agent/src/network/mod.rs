//! Instance networking: a network namespace per instance, wired to the node
//! with a veth pair, in routed mode (no bridge), through netlink.
//!
//! Inside the instance: `lo`, and `eth0` with the instance's address as a
//! /32, a link route to the gateway `169.254.1.1` and a default route via it.
//! On the node: the host end of the veth (`crl<hash>`) carries
//! `169.254.1.1/32`, so it answers the instance's ARP for the gateway, and a
//! `/32` route sends the instance's address down that veth. The node forwards
//! between instances (IPv4 forwarding is switched on in the node's network
//! namespace). Every address is a host route: there is no shared L2 segment
//! between instances, which is what the eBPF programs on the host veth need
//! to see every packet.

pub mod ipam;
pub mod plane;
pub mod services;

use corral_proto::InstanceId;
use futures_util::stream::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The routing protocol number on the routes to other cells' subnets that
/// the agent makes (`ip route show proto 200`), so that it can tell them
/// from the operator's.
pub const ROUTE_PROTOCOL: u8 = 200;

/// The gateway instances route through; owned by every host-side veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

/// What an instance's network is; persisted so a restarted agent can
/// re-adopt and later remove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub address: Ipv4Addr,
    pub host_if: String,
    /// The host veth's ifindex (the key of the data plane's `ifaces` map).
    #[serde(default)]
    pub host_ifindex: u32,
    pub netns: PathBuf,
}

/// The host-side interface name of an instance: 15 characters at most,
/// derived from the id (FNV-1a, 48 bits).
pub fn host_if_name(id: &InstanceId) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("crl{:012x}", h & 0xffff_ffff_ffff)
}

/// A netlink connection in the current (node) network namespace.
pub struct Network {
    handle: Handle,
}

/// Opens a netlink connection whose socket lives in the network namespace
/// `netns` (None: the calling thread's). The socket is created on a short
/// lived thread that entered the namespace, so no pooled thread changes
/// namespace.
fn connect(netns: Option<&Path>) -> Result<Handle, NetError> {
    let rt = tokio::runtime::Handle::current();
    let ns_file = match netns {
        Some(p) => Some(std::fs::File::open(p).map_err(io(format!("opening {}", p.display())))?),
        None => None,
    };
    let (conn, handle) = std::thread::spawn(move || -> Result<_, NetError> {
        if let Some(f) = &ns_file {
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetError::Other(format!("entering the instance's network namespace: {e}"))
            })?;
        }
        let _g = rt.enter();
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(io("opening a netlink socket"))?;
        Ok((conn, handle))
    })
    .join()
    .map_err(|_| NetError::Other("netlink set-up thread panicked".into()))??;
    tokio::spawn(conn);
    Ok(handle)
}

fn sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(io(format!("writing {path}")))
}

/// Creates a network namespace pinned by a bind mount at `path`.
pub fn create_netns(path: &Path) -> Result<(), NetError> {
    std::fs::File::create(path).map_err(io(format!("creating {}", path.display())))?;
    let p = path.to_owned();
    // unshare(CLONE_NEWNET) affects only the calling thread: a throw-away
    // thread makes the namespace and pins it, then exits.
    let r = std::thread::spawn(move || -> Result<(), NetError> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::Other(format!("creating a network namespace: {e}")))?;
        // Instances are IPv4-only and the data plane drops IPv6: switch it off
        // inside (for interfaces to come, too) instead of letting every
        // instance chatter router solicitations into the drop counters.
        // /proc/sys/net follows the opening thread's namespace.
        for f in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &p,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            NetError::Other(format!(
                "pinning the network namespace at {}: {e}",
                p.display()
            ))
        })
    })
    .join()
    .map_err(|_| NetError::Other("netns thread panicked".into()))?;
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Unpins and removes a network namespace file. Idempotent.
pub fn remove_netns(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

impl Network {
    /// Connects in the node's network namespace and enables forwarding.
    pub fn open() -> Result<Self, NetError> {
        let handle = connect(None)?;
        sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        Ok(Self { handle })
    }

    /// The node's IPv4 networks (address, prefix) for overlap checks.
    pub async fn node_networks(&self) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        let mut out = Vec::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(nl("listing the node's addresses"))?
        {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(a)) = attr {
                    if !a.is_loopback() && !a.is_link_local() {
                        out.push((*a, msg.header.prefix_len));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Makes the node's routes to other cells' instance subnets exactly
    /// `want` (subnet, prefix, via): routes this agent made carry protocol
    /// [`ROUTE_PROTOCOL`], so it removes only its own, and a restarted agent
    /// finds them. Returns (added, removed).
    pub async fn sync_routes(
        &self,
        want: &[((Ipv4Addr, u8), Ipv4Addr)],
    ) -> Result<(usize, usize), NetError> {
        let mut have = Vec::new();
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(msg) = routes
            .try_next()
            .await
            .map_err(nl("listing the node's routes"))?
        {
            if msg.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                continue;
            }
            let mut dst = None;
            let mut via = None;
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(*a),
                    RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = Some(*a),
                    _ => {}
                }
            }
            if let (Some(dst), Some(via)) = (dst, via) {
                have.push(((dst, msg.header.destination_prefix_length), via));
            }
        }
        let build = |((dst, prefix), via): ((Ipv4Addr, u8), Ipv4Addr)| {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, prefix)
                .gateway(via)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .build()
        };
        let mut removed = 0;
        for r in have.iter().filter(|r| !want.contains(r)) {
            self.handle
                .route()
                .del(build(*r))
                .execute()
                .await
                .map_err(nl(format!("removing the route to {}/{}", r.0 .0, r.0 .1)))?;
            removed += 1;
        }
        let mut added = 0;
        for r in want.iter().filter(|r| !have.contains(r)) {
            self.handle
                .route()
                .add(build(*r))
                .replace()
                .execute()
                .await
                .map_err(nl(format!("routing {}/{} via {}", r.0 .0, r.0 .1, r.1)))?;
            added += 1;
        }
        Ok((added, removed))
    }

    async fn index_of(&self, h: &Handle, name: &str) -> Result<Option<u32>, NetError> {
        let mut links = h.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(l.header.index)),
            Ok(None) => Ok(None),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl(format!("looking up link {name}"))(e)),
        }
    }

    /// Creates the instance's namespace at `netns` and wires it up with
    /// `address`. The host veth gets `ifindex` if given (or, when another
    /// interface has that index, the next one in the same data-plane slot:
    /// `ifindex` + k × [`corral_ebpf::SLOTS`]); else the kernel picks. On
    /// error everything made is removed again.
    pub async fn attach(
        &self,
        id: &InstanceId,
        address: Ipv4Addr,
        netns: &Path,
        ifindex: Option<u32>,
    ) -> Result<Attachment, NetError> {
        let mut att = Attachment {
            address,
            host_if: host_if_name(id),
            host_ifindex: 0,
            netns: netns.to_owned(),
        };
        create_netns(netns)?;
        match self.wire(&att, ifindex).await {
            Ok(idx) => {
                att.host_ifindex = idx;
                Ok(att)
            }
            Err(e) => {
                self.detach(&att).await;
                Err(e)
            }
        }
    }

    /// Creates the veth pair, the host side with `ifindex` (or another
    /// index of its slot, see [`Network::attach`]) if given.
    async fn create_veth(
        &self,
        host: &str,
        peer: &str,
        ifindex: Option<u32>,
    ) -> Result<(), NetError> {
        /// Indexes of one slot tried before giving up.
        const TRIES: u32 = 16;
        let Some(first) = ifindex else {
            return self
                .handle
                .link()
                .add(LinkVeth::new(host, peer).build())
                .execute()
                .await
                .map_err(nl(format!("creating veth {host}")));
        };
        let mut index = first;
        for _ in 0..TRIES {
            let mut msg = LinkVeth::new(host, peer).build();
            msg.header.index = index;
            match self.handle.link().add(msg).execute().await {
                Ok(()) => return Ok(()),
                // EBUSY: another interface has this index.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EBUSY => {
                    index = index.saturating_add(corral_ebpf::SLOTS);
                }
                Err(e) => return Err(nl(format!("creating veth {host} (ifindex {index})"))(e)),
            }
        }
        Err(NetError::Other(format!(
            "creating veth {host}: ifindexes {first}, {first} + {}, ... ({TRIES} of them) are all taken",
            corral_ebpf::SLOTS
        )))
    }

    /// Returns the host veth's ifindex.
    async fn wire(&self, att: &Attachment, ifindex: Option<u32>) -> Result<u32, NetError> {
        let h = &self.handle;
        let host = att.host_if.as_str();
        let peer = format!("{}p", &host[..host.len().min(14)]);
        self.create_veth(host, &peer, ifindex).await?;
        let host_idx = self
            .index_of(h, host)
            .await?
            .ok_or_else(|| NetError::Other(format!("veth {host} vanished")))?;
        let peer_idx = self
            .index_of(h, &peer)
            .await?
            .ok_or_else(|| NetError::Other(format!("veth {peer} vanished")))?;
        let ns = std::fs::File::open(&att.netns)
            .map_err(io(format!("opening {}", att.netns.display())))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(peer_idx)
                    .setns_by_fd(ns.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("moving the veth into the instance's namespace"))?;

        // Node side: IPv4 only, like the instance (see create_netns).
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{host}/disable_ipv6"), "1");
        h.address()
            .add(host_idx, IpAddr::V4(GATEWAY), 32)
            .execute()
            .await
            .map_err(nl(format!("adding {GATEWAY} to {host}")))?;
        h.link()
            .set(LinkUnspec::new_with_index(host_idx).up().build())
            .execute()
            .await
            .map_err(nl(format!("bringing {host} up")))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(att.address, 32)
            .output_interface(host_idx)
            .scope(RouteScope::Link)
            .build();
        h.route()
            .add(route)
            .execute()
            .await
            .map_err(nl(format!("routing {} to {host}", att.address)))?;

        // Instance side, through a socket inside its namespace.
        let ih = connect(Some(&att.netns))?;
        if let Some(lo) = self.index_of(&ih, "lo").await? {
            ih.link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(nl("bringing lo up"))?;
        }
        let idx = self
            .index_of(&ih, &peer)
            .await?
            .ok_or_else(|| NetError::Other("veth missing in the instance's namespace".into()))?;
        ih.link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .name("eth0".to_owned())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("configuring eth0"))?;
        ih.address()
            .add(idx, IpAddr::V4(att.address), 32)
            .execute()
            .await
            .map_err(nl(format!("adding {} to eth0", att.address)))?;
        let gw = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(GATEWAY, 32)
            .output_interface(idx)
            .scope(RouteScope::Link)
            .build();
        ih.route()
            .add(gw)
            .execute()
            .await
            .map_err(nl("adding the gateway route"))?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(GATEWAY)
            .build();
        ih.route()
            .add(default)
            .execute()
            .await
            .map_err(nl("adding the default route"))?;
        Ok(host_idx)
    }

    /// Removes the veth (its route and the peer go with it) and the
    /// namespace. Idempotent; errors are logged.
    pub async fn detach(&self, att: &Attachment) {
        match self.index_of(&self.handle, &att.host_if).await {
            Ok(Some(idx)) => {
                if let Err(e) = self.handle.link().del(idx).execute().await {
                    tracing::warn!("deleting {}: {e}", att.host_if);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("{e}"),
        }
        remove_netns(&att.netns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_if_names_fit_and_differ() {
        let a = host_if_name(&InstanceId::new("web-0").unwrap());
        let b = host_if_name(&InstanceId::new("web-1").unwrap());
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("crl"));
        assert_ne!(a, b);
    }
}
