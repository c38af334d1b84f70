use super::*;
use crate::instance::{InstanceState, MAX_INDEX};
use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::net::Ipv6Addr;

// ---------- strategies ----------

fn id_string() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}"
}

fn instance_id() -> impl Strategy<Value = InstanceId> {
    id_string().prop_map(|s| InstanceId::new(s).unwrap())
}

fn tenant() -> impl Strategy<Value = TenantId> {
    id_string().prop_map(|s| TenantId::new(s).unwrap())
}

fn app() -> impl Strategy<Value = AppId> {
    id_string().prop_map(|s| AppId::new(s).unwrap())
}

fn cell() -> impl Strategy<Value = CellId> {
    id_string().prop_map(|s| CellId::new(s).unwrap())
}

fn tags() -> impl Strategy<Value = BTreeSet<Tag>> {
    btree_set(id_string().prop_map(|s| Tag::new(s).unwrap()), 0..8)
}

fn capacity() -> impl Strategy<Value = Capacity> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(memory_mb, disk_mb, containers)| {
        Capacity {
            memory_mb,
            disk_mb,
            containers,
        }
    })
}

fn resources() -> impl Strategy<Value = Resources> {
    (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
        |(memory_mb, disk_mb, cpu_weight, max_pids)| Resources {
            memory_mb,
            disk_mb,
            cpu_weight,
            max_pids,
        },
    )
}

fn kind() -> impl Strategy<Value = InstanceKind> {
    prop_oneof![Just(InstanceKind::Lrp), Just(InstanceKind::Task)]
}

fn state() -> impl Strategy<Value = InstanceState> {
    proptest::sample::select(InstanceState::ALL.to_vec())
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn subnet() -> impl Strategy<Value = Ipv4Net> {
    (any::<u32>(), 0u8..=32).prop_map(|(a, p)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
        Ipv4Net::new(Ipv4Addr::from(a & mask), p).unwrap()
    })
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::from(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::from(Ipv6Addr::from(a))),
    ]
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    any::<u64>().prop_map(Timestamp::from_nanos)
}

fn info() -> impl Strategy<Value = InstanceInfo> {
    (
        (
            instance_id(),
            tenant(),
            app(),
            any::<u32>(),
            kind(),
            state(),
        ),
        (
            any::<Option<u32>>(),
            any::<Option<i32>>(),
            any::<Option<i32>>(),
            any::<bool>(),
        ),
        (
            proptest::option::of(timestamp()),
            proptest::option::of(timestamp()),
            proptest::option::of(text()),
            resources(),
            vec(any::<u16>(), 0..4),
            proptest::option::of(any::<u32>().prop_map(Ipv4Addr::from)),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (id, tenant, app, index, kind, state),
                (pid, exit_code, signal, oom_killed),
                (started_at, finished_at, reason, resources, ports, address, ready, lost),
            )| InstanceInfo {
                id,
                tenant,
                app,
                index,
                kind,
                state,
                pid,
                exit_code,
                signal,
                oom_killed,
                started_at,
                finished_at,
                reason,
                resources,
                ports,
                address,
                ready,
                lost,
            },
        )
}

fn spec() -> impl Strategy<Value = InstanceSpec> {
    (
        (tenant(), app(), 0..=MAX_INDEX, kind(), text()),
        vec(text(), 0..4),
        btree_map(text(), text(), 0..4),
        resources(),
        vec(any::<u16>(), 0..4),
        proptest::option::of((any::<u16>(), text(), any::<u32>()).prop_map(
            |(port, path, interval_ms)| crate::health::HealthCheck {
                kind: crate::health::CheckKind::Http,
                port,
                path,
                status: 200,
                interval_ms,
                timeout_ms: interval_ms / 2,
                failure_threshold: 3,
                start_timeout_ms: interval_ms,
            },
        )),
    )
        .prop_map(
            |((tenant, app, index, kind, rootfs), command, env, resources, ports, health_check)| {
                InstanceSpec {
                    tenant,
                    app,
                    index,
                    kind,
                    rootfs,
                    command,
                    env: env.into_iter().collect::<BTreeMap<_, _>>(),
                    resources,
                    ports,
                    health_check,
                }
            },
        )
}

fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(requested, free, total)| {
            Refusal::Capacity(CapacityError::Memory {
                requested,
                free,
                total,
            })
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(requested, free, total)| {
            Refusal::Capacity(CapacityError::Disk {
                requested,
                free,
                total,
            })
        }),
        any::<u64>().prop_map(|total| Refusal::Capacity(CapacityError::Containers { total })),
        tags().prop_map(|missing| Refusal::MissingTags { missing }),
        text().prop_map(|rootfs| Refusal::RootfsUnavailable { rootfs }),
        Just(Refusal::Evacuating),
        instance_id().prop_map(|id| Refusal::Duplicate { id }),
        instance_id().prop_map(|id| Refusal::UnknownInstance { id }),
        text().prop_map(|reason| Refusal::Invalid { reason }),
        text().prop_map(|reason| Refusal::Other { reason }),
    ]
}

fn versions() -> impl Strategy<Value = VersionRange> {
    (1u16.., any::<u16>()).prop_map(|(a, b)| {
        let (min, max) = (a.min(b.max(1)), a.max(b));
        VersionRange::new(min, max).unwrap()
    })
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        versions(),
        cell(),
        id_string().prop_map(|s| Zone::new(s).unwrap()),
        tags(),
        capacity(),
        capacity(),
        proptest::option::of(subnet()),
        vec(ip(), 0..4),
    )
        .prop_map(
            |(versions, cell, zone, tags, total, available, subnet, addresses)| Hello {
                versions,
                cell,
                zone,
                tags,
                total,
                available,
                subnet,
                addresses,
            },
        )
}

fn work_item() -> impl Strategy<Value = WorkItem> {
    (
        instance_id(),
        tenant(),
        app(),
        any::<u32>(),
        kind(),
        resources(),
        text(),
        tags(),
    )
        .prop_map(
            |(id, tenant, app, index, kind, resources, rootfs, tags)| WorkItem {
                id,
                tenant,
                app,
                index,
                kind,
                resources,
                rootfs,
                tags,
            },
        )
}

fn request() -> impl Strategy<Value = RequestId> {
    any::<u64>().prop_map(RequestId)
}

fn event_kind() -> impl Strategy<Value = InstanceEventKind> {
    prop_oneof![
        Just(InstanceEventKind::Started),
        (text(), any::<Option<i32>>())
            .prop_map(|(reason, exit_code)| InstanceEventKind::Crashed { reason, exit_code }),
        any::<Option<i32>>().prop_map(|exit_code| InstanceEventKind::Exited { exit_code }),
        Just(InstanceEventKind::Evacuating),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello().prop_map(Message::Hello),
        (any::<u16>(), id_string(), proptest::option::of(subnet())).prop_map(
            |(version, brain, subnet)| Message::HelloAck(HelloAck {
                version,
                brain: BrainId::new(brain).unwrap(),
                subnet,
            })
        ),
        (any::<u64>(), capacity(), any::<bool>(), vec(info(), 0..4)).prop_map(
            |(seq, available, evacuating, instances)| Message::StateSnapshot(StateSnapshot {
                seq,
                available,
                evacuating,
                instances,
            })
        ),
        (
            any::<u64>(),
            capacity(),
            vec(
                prop_oneof![
                    info().prop_map(|instance| StateChange::Upsert { instance }),
                    instance_id().prop_map(|id| StateChange::Removed { id }),
                ],
                0..4
            )
        )
            .prop_map(|(seq, available, changes)| Message::StateDelta(StateDelta {
                seq,
                available,
                changes,
            })),
        Just(Message::RequestState),
        (request(), vec(work_item(), 0..4))
            .prop_map(|(request, items)| Message::BidRequest(BidRequest { request, items })),
        (
            request(),
            vec(
                (
                    instance_id(),
                    prop_oneof![
                        any::<u32>().prop_map(BidOutcome::Score),
                        refusal().prop_map(BidOutcome::Refused)
                    ]
                )
                    .prop_map(|(id, outcome)| Bid { id, outcome }),
                0..4
            )
        )
            .prop_map(|(request, bids)| Message::Bids(Bids { request, bids })),
        (request(), instance_id(), spec())
            .prop_map(|(request, id, spec)| Message::StartWork(StartWork { request, id, spec })),
        (request(), instance_id(), any::<u64>(), 0u32..1_000_000_000).prop_map(
            |(request, id, s, n)| Message::StopWork(StopWork {
                request,
                id,
                grace: Duration::new(s, n),
            })
        ),
        (
            request(),
            prop_oneof![
                Just(AckOutcome::Done),
                refusal().prop_map(AckOutcome::Refused)
            ]
        )
            .prop_map(|(request, outcome)| Message::Ack(Ack { request, outcome })),
        (instance_id(), timestamp(), event_kind())
            .prop_map(|(id, at, kind)| Message::Event(InstanceEvent { id, at, kind })),
        any::<u64>().prop_map(|seq| Message::Ping { seq }),
        any::<u64>().prop_map(|seq| Message::Pong { seq }),
        vec(
            (cell(), subnet(), any::<[u8; 4]>()).prop_map(|(cell, subnet, ip)| Route {
                cell,
                subnet,
                via: IpAddr::from(ip)
            }),
            0..4
        )
        .prop_map(|routes| Message::Routes(Routes { routes })),
        (
            any::<bool>(),
            vec(
                (any::<[u8; 4]>(), tenant(), app(), instance_id(), cell()).prop_map(
                    |(ip, tenant, app, instance, cell)| RemoteEndpoint {
                        addr: Ipv4Addr::from(ip),
                        tenant,
                        app,
                        instance,
                        cell,
                    }
                ),
                0..4
            ),
            vec(any::<[u8; 4]>().prop_map(Ipv4Addr::from), 0..4)
        )
            .prop_map(|(reset, upsert, remove)| Message::Endpoints(Endpoints {
                reset,
                upsert,
                remove
            })),
        vec(
            (
                tenant(),
                tenant(),
                prop_oneof![
                    Just(crate::policy::Protocol::Any),
                    Just(crate::policy::Protocol::Icmp),
                    Just(crate::policy::Protocol::Tcp),
                    Just(crate::policy::Protocol::Udp),
                    Just(crate::policy::Protocol::Sctp),
                ],
                any::<u16>(),
                proptest::option::of(app())
            )
                .prop_map(|(from, to, protocol, port, app)| {
                    crate::policy::PolicyRule {
                        from,
                        to,
                        app,
                        protocol,
                        port,
                    }
                }),
            0..4
        )
        .prop_map(|policies| Message::Policies(Policies { policies })),
        (
            any::<bool>(),
            vec(
                (
                    any::<[u8; 4]>(),
                    tenant(),
                    app(),
                    vec(
                        (
                            any::<u16>(),
                            any::<bool>(),
                            proptest::option::of(any::<u16>())
                        )
                            .prop_map(|(port, udp, published)| {
                                crate::service::PortSpec {
                                    port,
                                    protocol: if udp {
                                        crate::service::Transport::Udp
                                    } else {
                                        crate::service::Transport::Tcp
                                    },
                                    published,
                                }
                            }),
                        0..4
                    ),
                    vec(any::<[u8; 4]>().prop_map(Ipv4Addr::from), 0..4)
                )
                    .prop_map(|(vip, tenant, app, ports, backends)| {
                        crate::service::Service {
                            vip: Ipv4Addr::from(vip),
                            tenant,
                            app,
                            ports,
                            backends,
                        }
                    }),
                0..3
            ),
            vec(any::<[u8; 4]>().prop_map(Ipv4Addr::from), 0..4)
        )
            .prop_map(|(reset, upsert, remove)| Message::Services(Services {
                reset,
                upsert,
                remove
            })),
    ]
}

// ---------- helpers ----------

/// Feeds `bytes` in pieces cut at `cuts` (any values; taken modulo the length).
fn decode_chunked(
    dec: &mut FrameDecoder,
    bytes: &[u8],
    cuts: &[usize],
) -> Result<Vec<Message>, WireError> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| c % (bytes.len() + 1))
        .chain([0, bytes.len()])
        .collect();
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::new();
    for pair in points.windows(2) {
        let mut input = &bytes[pair[0]..pair[1]];
        while let Some(msg) = dec.decode(&mut input)? {
            out.push(msg);
        }
        assert!(input.is_empty(), "Ok(None) with input left over");
    }
    Ok(out)
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Message>, WireError> {
    let mut dec = FrameDecoder::new();
    let out = decode_chunked(&mut dec, bytes, &[])?;
    dec.finish()?;
    Ok(out)
}

fn sample_hello() -> Hello {
    Hello {
        versions: SUPPORTED_VERSIONS,
        cell: CellId::new("cell-1").unwrap(),
        zone: Zone::new("z1").unwrap(),
        tags: [Tag::new("ssd").unwrap()].into(),
        total: Capacity {
            memory_mb: 4096,
            disk_mb: 10240,
            containers: 100,
        },
        available: Capacity {
            memory_mb: 2048,
            disk_mb: 10240,
            containers: 99,
        },
        subnet: Some("10.1.2.0/24".parse().unwrap()),
        addresses: vec![IpAddr::from([192, 0, 2, 1])],
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------- unit tests ----------

#[test]
fn ping_frame_is_stable() {
    // Variant 11, seq 7: a change here breaks every deployed peer.
    let frame = encode(&Message::Ping { seq: 7 }).unwrap();
    assert_eq!(frame, [0, 0, 0, 2, 11, 7]);
    let frame = encode(&Message::Pong { seq: 300 }).unwrap();
    assert_eq!(frame, [0, 0, 0, 3, 12, 0xac, 0x02]);
}

#[test]
fn hello_and_hello_ack_are_frozen() {
    // Every version must encode these exactly so: negotiation depends on it.
    let hello = encode(&Message::Hello(sample_hello())).unwrap();
    assert_eq!(
        hex(&hello),
        concat!(
            "00000028",       // payload length 40
            "00",             // Message::Hello
            "0202",           // versions 2..=2
            "0663656c6c2d31", // cell "cell-1"
            "027a31",         // zone "z1"
            "0103737364",     // tags {"ssd"}
            "80208050 64",    // total: 4096 MB, 10240 MB, 100 containers
            "80108050 63",    // available: 2048 MB, 10240 MB, 99
            "01 0a010200 18", // subnet Some(10.1.2.0/24)
            "01 00 c0000201", // addresses [V4 192.0.2.1]
        )
        .replace(' ', "")
    );
    let ack = encode(&Message::HelloAck(HelloAck {
        version: 1,
        brain: BrainId::new("b1").unwrap(),
        subnet: None,
    }))
    .unwrap();
    // Length 6, HelloAck, version 1, brain "b1", no subnet.
    assert_eq!(hex(&ack), "00000006 01 01 026231 00".replace(' ', ""));
}

#[test]
fn round_trip_of_each_kind() {
    let msgs = [
        Message::Hello(sample_hello()),
        Message::RequestState,
        Message::Event(InstanceEvent {
            id: InstanceId::new("web-0").unwrap(),
            at: Timestamp::from_nanos(u64::MAX),
            kind: InstanceEventKind::Crashed {
                reason: "out of memory".into(),
                exit_code: Some(137),
            },
        }),
    ];
    let mut stream = Vec::new();
    for m in &msgs {
        encode_into(m, &mut stream).unwrap();
    }
    assert_eq!(decode_all(&stream).unwrap(), msgs);
}

#[test]
fn oversized_prefix_is_refused_before_allocating() {
    let mut dec = FrameDecoder::new();
    let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let err = dec.decode(&mut input).unwrap_err();
    assert_eq!(
        err,
        WireError::FrameTooLarge {
            len: u64::from(u32::MAX),
            max: MAX_FRAME_LEN
        }
    );
    assert_eq!(
        err.to_string(),
        "frame of 4294967295 bytes exceeds the maximum of 1048576 bytes"
    );
    assert_eq!(dec.allocated(), 0);
    // The stream cannot be resynchronised: the decoder stays failed.
    let mut more: &[u8] = &[0, 0, 0, 2, 11, 7];
    assert!(matches!(
        dec.decode(&mut more),
        Err(WireError::FrameTooLarge { .. })
    ));

    // One byte over the limit, delivered a byte at a time.
    let mut dec = FrameDecoder::new();
    let prefix = u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes();
    for (i, b) in prefix.iter().enumerate() {
        let r = dec.decode(&mut &[*b][..]);
        if i < 3 {
            assert_eq!(r, Ok(None));
        } else {
            assert!(matches!(r, Err(WireError::FrameTooLarge { .. })));
        }
    }
    assert_eq!(dec.allocated(), 0);
}

#[test]
fn a_lying_prefix_costs_only_what_arrived() {
    let mut dec = FrameDecoder::new();
    let prefix = u32::try_from(MAX_FRAME_LEN).unwrap().to_be_bytes();
    let mut input: &[u8] = &prefix;
    assert_eq!(dec.decode(&mut input), Ok(None));
    assert_eq!(dec.allocated(), 0);
    let chunk = [0u8; 1000];
    for _ in 0..10 {
        assert_eq!(dec.decode(&mut &chunk[..]), Ok(None));
    }
    assert_eq!(dec.buffered(), 4 + 10_000);
    assert!(dec.allocated() <= 2 * 10_000, "{}", dec.allocated());
    // Filling the frame never allocates past it.
    let rest = vec![0u8; MAX_FRAME_LEN - 10_000];
    let r = dec.decode(&mut &rest[..]);
    assert!(matches!(r, Err(WireError::Malformed { .. })), "{r:?}");
    // A finished frame's large buffer is not kept.
    assert!(dec.allocated() <= codec::KEEP_BUFFER);
}

#[test]
fn truncated_at_close_is_reported() {
    let frame = encode(&Message::Ping { seq: 1 }).unwrap();
    let mut dec = FrameDecoder::new();
    assert_eq!(dec.decode(&mut &frame[..2]), Ok(None));
    let err = dec.finish().unwrap_err();
    assert_eq!(
        err,
        WireError::Truncated {
            buffered: 2,
            expected: None
        }
    );
    assert_eq!(
        err.to_string(),
        "stream ended in the middle of a frame: 2 of at least 4 bytes received"
    );
    assert_eq!(dec.decode(&mut &frame[2..5]), Ok(None));
    assert_eq!(
        dec.finish(),
        Err(WireError::Truncated {
            buffered: 5,
            expected: Some(6)
        })
    );
    assert_eq!(
        dec.decode(&mut &frame[5..]),
        Ok(Some(Message::Ping { seq: 1 }))
    );
    assert_eq!(dec.finish(), Ok(()));
}

#[test]
fn malformed_frames_are_typed_and_consumed() {
    let ping = encode(&Message::Ping { seq: 9 }).unwrap();
    let cases: [(&[u8], &str); 4] = [
        (&[0, 0, 0, 0], "malformed frame: "),      // empty payload
        (&[0, 0, 0, 1, 200], "malformed frame: "), // unknown variant
        (
            &[0, 0, 0, 3, 11, 7, 0],
            "malformed frame: 1 bytes left over",
        ),
        (&[0, 0, 0, 2, 11, 0x80], "malformed frame: "), // unterminated varint
    ];
    for (bad, msg) in cases {
        let mut stream = bad.to_vec();
        stream.extend_from_slice(&ping);
        let mut dec = FrameDecoder::new();
        let mut input = &stream[..];
        let err = dec.decode(&mut input).unwrap_err();
        assert!(err.to_string().starts_with(msg), "{err}");
        assert!(matches!(
            err,
            WireError::Malformed { .. } | WireError::TrailingBytes { .. }
        ));
        // The bad frame was consumed whole; the next one decodes.
        assert_eq!(dec.decode(&mut input), Ok(Some(Message::Ping { seq: 9 })));
    }
}

#[test]
fn invalid_ids_and_values_are_refused_on_decode() {
    let good = encode(&Message::Hello(sample_hello())).unwrap();
    let patch = |from: &[u8], to: &[u8]| {
        let at = good
            .windows(from.len())
            .position(|w| w == from)
            .expect("pattern present");
        let mut bad = good.clone();
        bad[at..at + to.len()].copy_from_slice(to);
        bad
    };
    // A cell id that is a path trick.
    let bad = patch(b"cell-1", b"../x/y");
    assert!(matches!(decode_all(&bad), Err(WireError::Malformed { .. })));
    // A subnet with host bits set (10.1.2.0/24 -> 10.1.2.9/24).
    let bad = patch(&[10, 1, 2, 0, 24], &[10, 1, 2, 9, 24]);
    assert!(matches!(decode_all(&bad), Err(WireError::Malformed { .. })));
    // A version range starting at 0.
    let bad = patch(&[0, 0, 0, 0x28, 0, 2, 2], &[0, 0, 0, 0x28, 0, 0, 2]);
    assert!(matches!(decode_all(&bad), Err(WireError::Malformed { .. })));
}

#[test]
fn list_bounds_hold_on_both_sides() {
    let mut hello = sample_hello();
    hello.tags = (0..=MAX_TAGS)
        .map(|i| Tag::new(format!("t{i}")).unwrap())
        .collect();
    let err = encode(&Message::Hello(hello.clone())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "hello.tags has 65 entries, more than the 64 allowed"
    );
    // A peer that skips the check is refused by the receiver, as soon as it
    // has read the count.
    let payload = postcard::to_allocvec(&Message::Hello(hello)).unwrap();
    let mut frame = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    assert!(matches!(
        decode_all(&frame),
        Err(WireError::Malformed { .. })
    ));
}

#[test]
fn oversized_messages_are_refused_by_encode() {
    let mut spec: InstanceSpec = serde_json::from_str(
        r#"{"tenant":"a","app":"b","kind":"lrp","rootfs":"/r","command":["x"],"resources":{"memory_mb":8}}"#,
    )
    .unwrap();
    spec.command = vec!["y".repeat(1 << 16); 17];
    let msg = Message::StartWork(StartWork {
        request: RequestId(1),
        id: InstanceId::new("i").unwrap(),
        spec,
    });
    let mut out = vec![1, 2, 3];
    let err = encode_into(&msg, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            WireError::FrameTooLarge {
                max: MAX_FRAME_LEN,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(out, [1, 2, 3], "a failed encode leaves the buffer alone");
}

#[test]
fn version_negotiation() {
    let r = |a, b| VersionRange::new(a, b).unwrap();
    assert_eq!(negotiate(r(1, 3), r(2, 5)), Ok(3));
    assert_eq!(negotiate(r(2, 5), r(1, 3)), Ok(3));
    assert_eq!(negotiate(r(1, 1), r(1, 1)), Ok(1));
    let err = negotiate(r(1, 2), r(3, 4)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no common protocol version: we speak versions 1..=2, the peer speaks versions 3..=4"
    );
    assert!(matches!(
        VersionRange::new(0, 1),
        Err(WireError::InvalidVersionRange { min: 0, max: 1 })
    ));
    assert!(VersionRange::new(3, 2).is_err());
    assert_eq!(check_chosen_version(r(1, 2), 2), Ok(2));
    assert_eq!(
        check_chosen_version(r(1, 2), 3).unwrap_err().to_string(),
        "the peer chose protocol version 3, but we speak versions 1..=2"
    );
    assert!(SUPPORTED_VERSIONS.contains(PROTOCOL_VERSION));
}

#[test]
fn subnets() {
    let n: Ipv4Net = "10.1.0.0/16".parse().unwrap();
    assert_eq!(n.to_string(), "10.1.0.0/16");
    assert!(n.contains(Ipv4Addr::new(10, 1, 200, 3)));
    assert!(!n.contains(Ipv4Addr::new(10, 2, 0, 1)));
    assert!("0.0.0.0/0"
        .parse::<Ipv4Net>()
        .unwrap()
        .contains(Ipv4Addr::BROADCAST));
    assert_eq!(
        "10.1.0.1/16".parse::<Ipv4Net>().unwrap_err().to_string(),
        "subnet 10.1.0.1/16 has host bits set (the network is 10.1.0.0/16)"
    );
    for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0.0/+8", "x/8", "10.0.0.0/"] {
        assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
    }
}

#[test]
fn labels_follow_the_id_rules_with_their_own_name() {
    assert!(Tag::new("ssd").is_ok());
    let err = Tag::new("a b").unwrap_err();
    assert!(
        err.to_string().starts_with("placement tag \"a b\""),
        "{err}"
    );
    assert_eq!(Zone::new("").unwrap_err().to_string(), "zone is empty");
    assert!(BrainId::new("../b").is_err());
}

#[test]
fn refusals_read_well() {
    let e = crate::capacity::CapacityError::Memory {
        requested: 512,
        free: 256,
        total: 1000,
    };
    assert_eq!(
        Refusal::from(e.clone()).to_string(),
        e.to_string(),
        "same words as the agent's own admission"
    );
    let missing = [Tag::new("gpu").unwrap(), Tag::new("ssd").unwrap()].into();
    assert_eq!(
        Refusal::MissingTags { missing }.to_string(),
        "the cell lacks placement tags gpu, ssd"
    );
}

#[test]
fn senders() {
    assert_eq!(Message::Hello(sample_hello()).sender(), Sender::Cell);
    assert_eq!(Message::RequestState.sender(), Sender::Brain);
    assert_eq!(Message::Ping { seq: 0 }.sender(), Sender::Either);
    for code in [
        CloseCode::Normal,
        CloseCode::Protocol,
        CloseCode::Version,
        CloseCode::Identity,
        CloseCode::Replaced,
    ] {
        assert_eq!(CloseCode::from_u32(code.as_u32()), Some(code));
    }
}

// ---------- properties ----------

proptest! {
    #[test]
    fn any_message_round_trips(msg in message()) {
        let frame = encode(&msg).unwrap();
        prop_assert!(frame.len() <= LEN_PREFIX + MAX_FRAME_LEN);
        prop_assert_eq!(decode_all(&frame).unwrap(), vec![msg]);
    }

    #[test]
    fn decoding_survives_any_chunking(
        msgs in vec(message(), 0..6),
        cuts in vec(any::<usize>(), 0..20),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_into(m, &mut stream).unwrap();
        }
        let mut dec = FrameDecoder::new();
        prop_assert_eq!(decode_chunked(&mut dec, &stream, &cuts).unwrap(), msgs);
        prop_assert_eq!(dec.finish(), Ok(()));
        prop_assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn a_stream_cut_inside_a_frame_is_truncated(
        msgs in vec(message(), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_into(m, &mut stream).unwrap();
        }
        let last = encode(msgs.last().unwrap()).unwrap().len();
        // Cut somewhere strictly inside the last frame.
        let keep = stream.len() - last + 1 + cut.index(last - 1);
        let mut dec = FrameDecoder::new();
        let got = decode_chunked(&mut dec, &stream[..keep], &[]).unwrap();
        prop_assert_eq!(&got[..], &msgs[..msgs.len() - 1]);
        let truncated = matches!(dec.finish(), Err(WireError::Truncated { .. }));
        prop_assert!(truncated);
    }

    #[test]
    fn arbitrary_bytes_never_panic_nor_overallocate(
        bytes in vec(any::<u8>(), 0..4096),
        cuts in vec(any::<usize>(), 0..16),
        max in prop_oneof![Just(MAX_FRAME_LEN), 0usize..600],
    ) {
        let mut dec = FrameDecoder::with_max_frame_len(max);
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.extend([0, bytes.len()]);
        points.sort_unstable();
        for pair in points.windows(2) {
            let mut input = &bytes[pair[0]..pair[1]];
            loop {
                let before = input.len();
                let r = dec.decode(&mut input);
                prop_assert!(dec.buffered() <= LEN_PREFIX + max);
                prop_assert!(dec.allocated() <= max);
                match r {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        prop_assert!(input.is_empty());
                        break;
                    }
                    Err(WireError::FrameTooLarge { .. }) => break,
                    Err(WireError::Malformed { .. } | WireError::TrailingBytes { .. }) => {
                        // A bad frame is consumed, so decoding makes progress.
                        prop_assert!(input.len() < before || dec.buffered() == 0);
                    }
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                }
            }
        }
        let _ = dec.finish();
    }

    #[test]
    fn corrupted_frames_never_panic(
        msg in message(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut frame = encode(&msg).unwrap();
        for (at, byte) in flips {
            let i = at.index(frame.len());
            frame[i] = byte;
        }
        let mut dec = FrameDecoder::new();
        let mut input = &frame[..];
        while let Ok(Some(_)) = dec.decode(&mut input) {}
        let _ = dec.finish();
    }
}
