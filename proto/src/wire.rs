//! The cell ⇄ brain protocol: its messages ([`Message`]) and their framing
//! ([`encode`], [`FrameDecoder`]). Pure: no sockets, no clocks. The brain and
//! the agent move bytes; this module turns them into messages and back.
//!
//! A conversation, on one bidirectional QUIC stream opened by the cell:
//!
//! ```text
//! cell  → brain  Hello                  versions, identity claim, capacity, tags
//! brain → cell   HelloAck               chosen version (or a close: no common version)
//! cell  → brain  StateSnapshot          everything the cell runs, then StateDelta as it changes
//! brain → cell   RequestState           ask for a fresh snapshot (e.g. after a seq gap)
//! brain → cell   BidRequest             a batch of work items
//! cell  → brain  Bids                   a score or a refusal per item
//! brain → cell   StartWork / StopWork
//! cell  → brain  Ack                    done, or refused with a reason
//! cell  → brain  Event                  started, crashed, exited, evacuating
//! either         Ping / Pong            liveness, matched by sequence number
//! brain → cell   Routes                 every other cell's instance subnet and node address
//! brain → cell   Endpoints              the cluster's instances (address → tenant), incrementally
//! brain → cell   Policies               every cross-tenant policy (the whole set)
//! brain → cell   Services               every app's VIP, ports and ready instances, incrementally
//! ```
//!
//! Frames are a `u32` big-endian payload length followed by a postcard
//! payload of at most [`MAX_FRAME_LEN`] bytes. postcard is not
//! self-describing, so compatibility rules are structural:
//!
//! - [`Message`] variants are identified by position: only append, never
//!   reorder or remove.
//! - [`Hello`] and [`HelloAck`] are frozen: every protocol version encodes them
//!   exactly as version 1 does, so two peers can always negotiate. What a later
//!   version adds to the greeting travels in a new message after `HelloAck`.
//! - Any other change to a message's fields needs a new protocol version.
//!
//! Versions: 1, the first; 2 added [`InstanceInfo::lost`] (2026-12). Before
//! a release a build speaks only its own version: a peer of another is
//! refused at hello, with both sides' ranges in the error.
//!
//! Decoding validates what the types can: ids, tags, subnets and version
//! ranges refuse bad values, and every list this module defines has a bound
//! checked *while* decoding (as soon as its length prefix is read). Memory is
//! bounded by the frame: the decoder buffers at most one frame, and a decoded
//! message is at most a small multiple of its frame's size. The largest
//! multiple comes from the lists inside [`InstanceSpec`] (`command`, `env`),
//! which only the frame limit bounds: a maximal `StartWork` of one-byte
//! arguments decodes to about 18 times its size (measured in
//! `brain/tests/wire_memory.rs`). Those only travel brain → cell.
//!
//! Timestamps travel as integer nanoseconds, not as the RFC 3339 strings of
//! [`Timestamp`]'s own serde form: smaller, and nothing to parse.
//!
//! Semantic checks (is this spec acceptable, is this instance known) belong
//! to the receiver, which answers them with a [`Refusal`] instead of
//! dropping the connection.

use crate::capacity::{Capacity, CapacityError};
use crate::ids::{AppId, CellId, InstanceId, TenantId};
use crate::instance::{InstanceInfo, InstanceKind, InstanceSpec, Resources};
use crate::service::{Service, MAX_SERVICE_BACKENDS, MAX_SERVICE_PORTS};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

#[path = "wire_codec.rs"]
mod codec;
#[path = "wire_serde.rs"]
pub(crate) mod serde_util;

pub use codec::{
    check_chosen_version, encode, encode_into, negotiate, FrameDecoder, WireError, LEN_PREFIX,
    MAX_FRAME_LEN,
};

/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 2;
/// Every protocol version this build speaks.
pub const SUPPORTED_VERSIONS: VersionRange = VersionRange { min: 2, max: 2 };

/// Most placement tags a cell or a work item may carry.
pub const MAX_TAGS: usize = 64;
/// Most addresses a cell may announce.
pub const MAX_ADDRESSES: usize = 16;
/// Most instances in one [`StateSnapshot`]. A cell runs far fewer; the
/// snapshot must also fit in one frame, which [`encode`] checks.
pub const MAX_SNAPSHOT_INSTANCES: usize = 4096;
/// Most changes in one [`StateDelta`].
pub const MAX_DELTA_CHANGES: usize = 1024;
/// Most work items in one [`BidRequest`] (and bids in one [`Bids`]).
pub const MAX_BATCH_ITEMS: usize = 1024;
/// Most routes (other cells) in one [`Routes`].
pub const MAX_ROUTES: usize = 4096;
/// Most upserts plus removals in one [`Endpoints`].
pub const MAX_ENDPOINTS: usize = 4096;
/// Most policies in one [`Policies`].
pub const MAX_POLICIES: usize = 16_384;
/// Most upserts plus removals in one [`Services`].
pub const MAX_SERVICES: usize = 1024;

/// An inclusive range of protocol versions, never empty, never containing 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "(u16, u16)", into = "(u16, u16)")]
pub struct VersionRange {
    min: u16,
    max: u16,
}

impl VersionRange {
    pub fn new(min: u16, max: u16) -> Result<Self, WireError> {
        if min == 0 || min > max {
            return Err(WireError::InvalidVersionRange { min, max });
        }
        Ok(Self { min, max })
    }

    pub fn min(self) -> u16 {
        self.min
    }

    pub fn max(self) -> u16 {
        self.max
    }

    pub fn contains(self, version: u16) -> bool {
        (self.min..=self.max).contains(&version)
    }
}

impl TryFrom<(u16, u16)> for VersionRange {
    type Error = WireError;
    fn try_from((min, max): (u16, u16)) -> Result<Self, WireError> {
        Self::new(min, max)
    }
}

impl From<VersionRange> for (u16, u16) {
    fn from(r: VersionRange) -> Self {
        (r.min, r.max)
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.min)
        } else {
            write!(f, "versions {}..={}", self.min, self.max)
        }
    }
}

crate::ids::id_type!(
    /// A brain node, as named in its certificate.
    BrainId,
    "brain id"
);
crate::ids::id_type!(
    /// A failure domain (rack, room, availability zone); the auctioneer
    /// spreads an app's instances across zones.
    Zone,
    "zone"
);
crate::ids::id_type!(
    /// A placement tag (`ssd`, `gpu`, `pci-dss`): work that requires tags only
    /// goes to cells that have all of them.
    Tag,
    "placement tag"
);

/// An IPv4 network in CIDR form; the address has no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "(Ipv4Addr, u8)", into = "(Ipv4Addr, u8)")]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("subnet {0:?} is not of the form a.b.c.d/len")]
    Syntax(String),
    #[error("subnet prefix length {0} is longer than 32")]
    Prefix(u8),
    #[error("subnet {addr}/{prefix} has host bits set (the network is {network}/{prefix})")]
    HostBits {
        addr: Ipv4Addr,
        prefix: u8,
        network: Ipv4Addr,
    },
}

impl Ipv4Net {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, SubnetError> {
        if prefix > 32 {
            return Err(SubnetError::Prefix(prefix));
        }
        let network = Ipv4Addr::from(u32::from(addr) & Self::mask(prefix));
        if network != addr {
            return Err(SubnetError::HostBits {
                addr,
                prefix,
                network,
            });
        }
        Ok(Self { addr, prefix })
    }

    fn mask(prefix: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
    }

    pub fn addr(self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether the two share an address.
    pub fn overlaps(self, other: Ipv4Net) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl TryFrom<(Ipv4Addr, u8)> for Ipv4Net {
    type Error = SubnetError;
    fn try_from((addr, prefix): (Ipv4Addr, u8)) -> Result<Self, SubnetError> {
        Self::new(addr, prefix)
    }
}

impl From<Ipv4Net> for (Ipv4Addr, u8) {
    fn from(n: Ipv4Net) -> Self {
        (n.addr, n.prefix)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = SubnetError;
    fn from_str(s: &str) -> Result<Self, SubnetError> {
        let syntax = || SubnetError::Syntax(s.to_owned());
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        // u8::from_str accepts a leading '+'; a prefix is digits only.
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        Self::new(addr, prefix)
    }
}

/// Correlates a request (bid request, start, stop) with its answer. Chosen by
/// the sender, unique per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Everything that crosses a cell ⇄ brain connection.
///
/// The position of a variant is its wire tag: append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    StateSnapshot(StateSnapshot),
    StateDelta(StateDelta),
    RequestState,
    BidRequest(BidRequest),
    Bids(Bids),
    StartWork(StartWork),
    StopWork(StopWork),
    Ack(Ack),
    Event(InstanceEvent),
    Ping { seq: u64 },
    Pong { seq: u64 },
    Routes(Routes),
    Endpoints(Endpoints),
    Policies(Policies),
    Services(Services),
}

/// Who may send a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Cell,
    Brain,
    Either,
}

impl Message {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::HelloAck(_) => "hello-ack",
            Self::StateSnapshot(_) => "state-snapshot",
            Self::StateDelta(_) => "state-delta",
            Self::RequestState => "request-state",
            Self::BidRequest(_) => "bid-request",
            Self::Bids(_) => "bids",
            Self::StartWork(_) => "start-work",
            Self::StopWork(_) => "stop-work",
            Self::Ack(_) => "ack",
            Self::Event(_) => "event",
            Self::Ping { .. } => "ping",
            Self::Pong { .. } => "pong",
            Self::Routes(_) => "routes",
            Self::Endpoints(_) => "endpoints",
            Self::Policies(_) => "policies",
            Self::Services(_) => "services",
        }
    }

    /// Which side may send this message; a receiver refuses the others.
    pub fn sender(&self) -> Sender {
        match self {
            Self::Hello(_)
            | Self::StateSnapshot(_)
            | Self::StateDelta(_)
            | Self::Bids(_)
            | Self::Ack(_)
            | Self::Event(_) => Sender::Cell,
            Self::HelloAck(_)
            | Self::RequestState
            | Self::BidRequest(_)
            | Self::StartWork(_)
            | Self::StopWork(_)
            | Self::Routes(_)
            | Self::Endpoints(_)
            | Self::Policies(_)
            | Self::Services(_) => Sender::Brain,
            Self::Ping { .. } | Self::Pong { .. } => Sender::Either,
        }
    }

    /// Checks the list bounds that the receiver enforces while decoding, so
    /// that a sender learns of an oversized message from [`encode`] with a
    /// clear error rather than from the peer dropping the connection.
    pub fn check_limits(&self) -> Result<(), WireError> {
        fn at_most(what: &'static str, count: usize, max: usize) -> Result<(), WireError> {
            if count > max {
                return Err(WireError::TooMany { what, count, max });
            }
            Ok(())
        }
        match self {
            Self::Hello(h) => {
                at_most("hello.tags", h.tags.len(), MAX_TAGS)?;
                at_most("hello.addresses", h.addresses.len(), MAX_ADDRESSES)
            }
            Self::StateSnapshot(s) => at_most(
                "state-snapshot.instances",
                s.instances.len(),
                MAX_SNAPSHOT_INSTANCES,
            ),
            Self::StateDelta(d) => {
                at_most("state-delta.changes", d.changes.len(), MAX_DELTA_CHANGES)
            }
            Self::BidRequest(r) => {
                at_most("bid-request.items", r.items.len(), MAX_BATCH_ITEMS)?;
                r.items
                    .iter()
                    .try_for_each(|i| at_most("bid-request.items[].tags", i.tags.len(), MAX_TAGS))
            }
            Self::Bids(b) => {
                at_most("bids.bids", b.bids.len(), MAX_BATCH_ITEMS)?;
                b.bids.iter().try_for_each(|b| match &b.outcome {
                    BidOutcome::Refused(r) => r.check_limits(),
                    BidOutcome::Score(_) => Ok(()),
                })
            }
            Self::Ack(a) => match &a.outcome {
                AckOutcome::Refused(r) => r.check_limits(),
                AckOutcome::Done => Ok(()),
            },
            Self::Routes(r) => at_most("routes.routes", r.routes.len(), MAX_ROUTES),
            Self::Endpoints(e) => at_most(
                "endpoints.upsert+remove",
                e.upsert.len() + e.remove.len(),
                MAX_ENDPOINTS,
            ),
            Self::Policies(p) => at_most("policies.policies", p.policies.len(), MAX_POLICIES),
            Self::Services(s) => {
                at_most(
                    "services.upsert+remove",
                    s.upsert.len() + s.remove.len(),
                    MAX_SERVICES,
                )?;
                s.upsert.iter().try_for_each(|v| {
                    at_most("services.upsert[].ports", v.ports.len(), MAX_SERVICE_PORTS)?;
                    at_most(
                        "services.upsert[].backends",
                        v.backends.len(),
                        MAX_SERVICE_BACKENDS,
                    )
                })
            }
            Self::HelloAck(_)
            | Self::RequestState
            | Self::StartWork(_)
            | Self::StopWork(_)
            | Self::Event(_)
            | Self::Ping { .. }
            | Self::Pong { .. } => Ok(()),
        }
    }
}

/// The cell's greeting: the first message on a connection. Frozen (see the
/// module docs). The cell id here is a claim; the brain trusts only the id in
/// the cell's certificate and refuses a hello that disagrees with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must stay the first field: it is what any version can read.
    pub versions: VersionRange,
    pub cell: CellId,
    pub zone: Zone,
    #[serde(deserialize_with = "serde_util::bounded_set::<_, _, MAX_TAGS>")]
    pub tags: BTreeSet<Tag>,
    pub total: Capacity,
    pub available: Capacity,
    /// The instance subnet this cell already uses, if it has one.
    pub subnet: Option<Ipv4Net>,
    /// Node addresses through which other cells reach `subnet`.
    #[serde(deserialize_with = "serde_util::bounded_vec::<_, _, MAX_ADDRESSES>")]
    pub addresses: Vec<IpAddr>,
}

/// The brain's answer to [`Hello`]. Frozen (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The version both sides speak from now on; see [`negotiate`].
    pub version: u16,
    pub brain: BrainId,
    /// The instance subnet the brain assigns, when it manages addressing.
    pub subnet: Option<Ipv4Net>,
}

/// Everything a cell runs, with a sequence number that the following
/// [`StateDelta`]s continue (the first delta after snapshot `n` is `n + 1`).
/// A receiver that sees a gap asks for a new snapshot with
/// [`Message::RequestState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub seq: u64,
    pub available: Capacity,
    /// The cell is shutting down and takes no new work.
    pub evacuating: bool,
    #[serde(with = "serde_util::instance_list")]
    pub instances: Vec<InstanceInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDelta {
    pub seq: u64,
    pub available: Capacity,
    #[serde(deserialize_with = "serde_util::bounded_vec::<_, _, MAX_DELTA_CHANGES>")]
    pub changes: Vec<StateChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateChange {
    /// The instance is new or changed; this is its whole current state.
    Upsert {
        #[serde(with = "serde_util::instance_info")]
        instance: InstanceInfo,
    },
    /// The instance is gone from the cell, record and all.
    Removed { id: InstanceId },
}

/// One thing to be placed: what a cell needs to know to bid for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    pub id: InstanceId,
    pub tenant: TenantId,
    pub app: AppId,
    pub index: u32,
    pub kind: InstanceKind,
    pub resources: Resources,
    pub rootfs: String,
    /// Tags the cell must all have.
    #[serde(deserialize_with = "serde_util::bounded_set::<_, _, MAX_TAGS>")]
    pub tags: BTreeSet<Tag>,
}

impl WorkItem {
    pub fn new(id: InstanceId, spec: &InstanceSpec, tags: BTreeSet<Tag>) -> Self {
        Self {
            id,
            tenant: spec.tenant.clone(),
            app: spec.app.clone(),
            index: spec.index,
            kind: spec.kind,
            resources: spec.resources.clone(),
            rootfs: spec.rootfs.clone(),
            tags,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BidRequest {
    pub request: RequestId,
    #[serde(deserialize_with = "serde_util::bounded_vec::<_, _, MAX_BATCH_ITEMS>")]
    pub items: Vec<WorkItem>,
}

/// The answer to a [`BidRequest`]: one bid per item, same request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bids {
    pub request: RequestId,
    #[serde(deserialize_with = "serde_util::bounded_vec::<_, _, MAX_BATCH_ITEMS>")]
    pub bids: Vec<Bid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bid {
    pub id: InstanceId,
    pub outcome: BidOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BidOutcome {
    /// The cell can take the item; lower is better (as in Diego's auctions).
    Score(u32),
    Refused(Refusal),
}

/// Why a cell will not (or cannot) do something.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The cell lacks memory, disk or a container slot.
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error("the cell lacks placement tags {}", join(.missing))]
    MissingTags {
        #[serde(deserialize_with = "serde_util::bounded_set::<_, _, MAX_TAGS>")]
        missing: BTreeSet<Tag>,
    },
    #[error("root filesystem {rootfs:?} is not available on this cell")]
    RootfsUnavailable { rootfs: String },
    #[error("the cell is evacuating and takes no new work")]
    Evacuating,
    #[error("instance {id} already exists on this cell")]
    Duplicate { id: InstanceId },
    #[error("no instance {id} on this cell")]
    UnknownInstance { id: InstanceId },
    #[error("invalid work: {reason}")]
    Invalid { reason: String },
    #[error("{reason}")]
    Other { reason: String },
}

fn join(tags: &BTreeSet<Tag>) -> String {
    tags.iter().map(Tag::as_str).collect::<Vec<_>>().join(", ")
}

impl Refusal {
    fn check_limits(&self) -> Result<(), WireError> {
        match self {
            Self::MissingTags { missing } if missing.len() > MAX_TAGS => Err(WireError::TooMany {
                what: "refusal.missing",
                count: missing.len(),
                max: MAX_TAGS,
            }),
            _ => Ok(()),
        }
    }
}

/// Run this instance. The cell validates the spec itself and refuses a bad
/// one with [`Refusal::Invalid`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartWork {
    pub request: RequestId,
    pub id: InstanceId,
    pub spec: InstanceSpec,
}

/// Stop this instance: SIGTERM, then SIGKILL after `grace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopWork {
    pub request: RequestId,
    pub id: InstanceId,
    pub grace: Duration,
}

/// The answer to [`StartWork`] or [`StopWork`], same request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub request: RequestId,
    pub outcome: AckOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckOutcome {
    /// Accepted: the instance is starting (or stopping); what becomes of it
    /// arrives as [`InstanceEvent`]s.
    Done,
    Refused(Refusal),
}

/// Something notable that happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceEvent {
    pub id: InstanceId,
    #[serde(with = "serde_util::nanos")]
    pub at: Timestamp,
    pub kind: InstanceEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceEventKind {
    Started,
    Crashed {
        reason: String,
        exit_code: Option<i32>,
    },
    Exited {
        exit_code: Option<i32>,
    },
    /// The cell is going away; the brain should place a replacement before
    /// the cell stops this instance.
    Evacuating,
}

impl InstanceEventKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Crashed { .. } => "crashed",
            Self::Exited { .. } => "exited",
            Self::Evacuating => "evacuating",
        }
    }
}

/// How to reach every other cell's instances: the whole set, sent after
/// `HelloAck` and whenever it changes. A cell routes each `subnet` via `via`
/// and removes routes it made that are no longer listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    #[serde(deserialize_with = "serde_util::bounded_vec::<_, _, MAX_ROUTES>")]
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Route {
    pub cell: CellId,
    pub subnet: Ipv4Net,
    /// The other cell's node address.
    pub via: IpAddr,
}

/// Changes to the cluster-wide endpoint map (instance address → tenant),
/// which every cell's data plane uses to keep tenants apart across cells.
/// `reset` first forgets every endpoint learnt from the brain (the first
/// message of a connection has it; a full map may take several messages,
/// only the first of which resets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub reset: bool,
    #[serde(deserialize_with = "serde_util::bounded_vec::<_, _, MAX_ENDPOINTS>")]
    pub upsert: Vec<RemoteEndpoint>,
    #[serde(deserialize_with = "serde_util::bounded_vec::<_, _, MAX_ENDPOINTS>")]
    pub remove: Vec<Ipv4Addr>,
}

/// An instance somewhere in the cluster, as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemoteEndpoint {
    pub addr: Ipv4Addr,
    pub tenant: TenantId,
    pub app: AppId,
    pub instance: InstanceId,
    pub cell: CellId,
}

/// Every cross-tenant policy of the cluster: the whole set, sent after
/// `HelloAck` and whenever it changes. The cell's data plane then holds
/// exactly these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policies {
    #[serde(deserialize_with = "serde_util::bounded_vec::<_, _, MAX_POLICIES>")]
    pub policies: Vec<crate::policy::PolicyRule>,
}

/// Changes to the cluster's services (one per app with ports: its VIP, its
/// ports and its ready instances), which every cell's load balancer
/// programs. `reset` first forgets every service learnt from the brain (the
/// first message of a connection has it). An upsert replaces the service
/// with that VIP whole; `remove` lists VIPs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    pub reset: bool,
    #[serde(deserialize_with = "serde_util::bounded_vec::<_, _, MAX_SERVICES>")]
    pub upsert: Vec<Service>,
    #[serde(deserialize_with = "serde_util::bounded_vec::<_, _, MAX_SERVICES>")]
    pub remove: Vec<Ipv4Addr>,
}

/// QUIC application close codes for a cell ⇄ brain connection, so that the
/// side being dropped learns why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly shutdown.
    Normal = 0,
    /// The peer sent a frame that could not be decoded, or a message it may
    /// not send, or in the wrong order.
    Protocol = 1,
    /// No common protocol version.
    Version = 2,
    /// The hello names another cell than the certificate does.
    Identity = 3,
    /// The same cell connected again; this older connection is replaced.
    Replaced = 4,
    /// The cell's configuration conflicts with the cluster's (e.g. its
    /// subnet overlaps the brain's VIP range).
    Conflict = 5,
}

impl CloseCode {
    pub fn from_u32(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::Normal,
            1 => Self::Protocol,
            2 => Self::Version,
            3 => Self::Identity,
            4 => Self::Replaced,
            5 => Self::Conflict,
            _ => return None,
        })
    }

    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
