//! serde helpers for the wire: lists with bounds enforced while decoding,
//! and timestamps as integers.

use crate::ids::{AppId, InstanceId, TenantId};
use crate::instance::{InstanceInfo, InstanceKind, InstanceState, Resources};
use crate::time::Timestamp;
use serde::de::{Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeSet;
use std::fmt;
use std::marker::PhantomData;
use std::net::Ipv4Addr;

/// Preallocate at most this many elements on the word of a length prefix;
/// beyond it the vector grows as elements actually arrive.
const PREALLOCATE: usize = 64;

struct Bounded<T, const N: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for Bounded<T, N> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a sequence of at most {N} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let hint = seq.size_hint().unwrap_or(0);
        if hint > N {
            return Err(A::Error::invalid_length(hint, &self));
        }
        let mut out = Vec::with_capacity(hint.min(PREALLOCATE));
        while let Some(item) = seq.next_element()? {
            if out.len() == N {
                return Err(A::Error::invalid_length(N + 1, &self));
            }
            out.push(item);
        }
        Ok(out)
    }
}

/// A `Vec` of at most `N` elements, refused as soon as the count is known.
pub(super) fn bounded_vec<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(Bounded::<T, N>(PhantomData))
}

/// A `Vec` of any length, preallocated no more than [`bounded_vec`]'s: for
/// lists whose bound is checked after decoding (an instance spec's
/// `validate` reports every problem at once), so that a length prefix
/// lying inside a small frame costs no more memory than the elements that
/// actually arrive. serde's own `Vec` preallocates up to 1 MiB on the word
/// of the prefix (found by the decoder's memory test: 13.5 KiB for a
/// 124-byte frame).
pub(crate) fn capped_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    bounded_vec::<D, T, { usize::MAX }>(d)
}

/// A set of at most `N` elements (duplicates on the wire count).
pub(super) fn bounded_set<'de, D, T, const N: usize>(d: D) -> Result<BTreeSet<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Ord,
{
    bounded_vec::<D, T, N>(d).map(|v| v.into_iter().collect())
}

/// A [`Timestamp`] as its nanoseconds: eight bytes at most instead of a
/// thirty-byte RFC 3339 string, and nothing to parse.
pub(super) mod nanos {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(t.nanos())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        u64::deserialize(d).map(Timestamp::from_nanos)
    }
}

// `InstanceInfo` travels as this record: the same fields in the same order,
// timestamps as integers. Two structs (borrowed for encoding, owned for
// decoding) avoid cloning a whole snapshot to send it; the round-trip tests
// catch any drift between them.
#[derive(Serialize)]
struct RecordRef<'a> {
    id: &'a InstanceId,
    tenant: &'a TenantId,
    app: &'a AppId,
    index: u32,
    kind: InstanceKind,
    state: InstanceState,
    pid: Option<u32>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    oom_killed: bool,
    started_at: Option<u64>,
    finished_at: Option<u64>,
    reason: &'a Option<String>,
    resources: &'a Resources,
    ports: &'a [u16],
    address: Option<Ipv4Addr>,
    ready: bool,
    lost: bool,
}

#[derive(Deserialize)]
struct Record {
    id: InstanceId,
    tenant: TenantId,
    app: AppId,
    index: u32,
    kind: InstanceKind,
    state: InstanceState,
    pid: Option<u32>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    oom_killed: bool,
    started_at: Option<u64>,
    finished_at: Option<u64>,
    reason: Option<String>,
    resources: Resources,
    // Each port is at least one byte on the wire and two in memory: no
    // amplification worth a bound beyond the frame's, once the
    // preallocation is capped.
    #[serde(deserialize_with = "capped_vec")]
    ports: Vec<u16>,
    address: Option<Ipv4Addr>,
    ready: bool,
    lost: bool,
}

impl<'a> From<&'a InstanceInfo> for RecordRef<'a> {
    fn from(i: &'a InstanceInfo) -> Self {
        Self {
            id: &i.id,
            tenant: &i.tenant,
            app: &i.app,
            index: i.index,
            kind: i.kind,
            state: i.state,
            pid: i.pid,
            exit_code: i.exit_code,
            signal: i.signal,
            oom_killed: i.oom_killed,
            started_at: i.started_at.map(Timestamp::nanos),
            finished_at: i.finished_at.map(Timestamp::nanos),
            reason: &i.reason,
            resources: &i.resources,
            ports: &i.ports,
            address: i.address,
            ready: i.ready,
            lost: i.lost,
        }
    }
}

impl From<Record> for InstanceInfo {
    fn from(r: Record) -> Self {
        Self {
            id: r.id,
            tenant: r.tenant,
            app: r.app,
            index: r.index,
            kind: r.kind,
            state: r.state,
            pid: r.pid,
            exit_code: r.exit_code,
            signal: r.signal,
            oom_killed: r.oom_killed,
            started_at: r.started_at.map(Timestamp::from_nanos),
            finished_at: r.finished_at.map(Timestamp::from_nanos),
            reason: r.reason,
            resources: r.resources,
            ports: r.ports,
            address: r.address,
            ready: r.ready,
            lost: r.lost,
        }
    }
}

pub(super) mod instance_info {
    use super::*;

    pub fn serialize<S: Serializer>(i: &InstanceInfo, s: S) -> Result<S::Ok, S::Error> {
        RecordRef::from(i).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<InstanceInfo, D::Error> {
        Record::deserialize(d).map(InstanceInfo::from)
    }
}

pub(super) mod instance_list {
    use super::*;
    use crate::wire::MAX_SNAPSHOT_INSTANCES;

    pub fn serialize<S: Serializer>(list: &[InstanceInfo], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(list.iter().map(RecordRef::from))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<InstanceInfo>, D::Error> {
        let records = bounded_vec::<D, Record, MAX_SNAPSHOT_INSTANCES>(d)?;
        Ok(records.into_iter().map(InstanceInfo::from).collect())
    }
}
