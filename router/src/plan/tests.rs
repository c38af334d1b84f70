use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::maglev::{table_size_for, DEFAULT_TABLE_SIZE};
use crate::service::{Backend, ServiceTable};
use crate::testing::*;
use crate::{Limits, Weight};

/// The service key, ring and backend ids an operation touches.
fn touches(op: &Op) -> (Option<ServiceKey>, Option<RingKey>, Option<BackendId>) {
    match op {
        Op::PutBackend { id, .. } | Op::DeleteBackend { id } => (None, None, Some(*id)),
        Op::CreateRing { ring, .. } | Op::PutRingSlots { ring, .. } | Op::DeleteRing { ring } => {
            (None, Some(*ring), None)
        }
        Op::PutService { key, .. } | Op::DeleteService { key } => (Some(*key), None, None),
    }
}

fn kind(op: &Op) -> &'static str {
    match op {
        Op::PutBackend { .. } => "put-backend",
        Op::CreateRing { .. } => "create-ring",
        Op::PutRingSlots { .. } => "put-ring-slots",
        Op::PutService { .. } => "put-service",
        Op::DeleteService { .. } => "delete-service",
        Op::DeleteRing { .. } => "delete-ring",
        Op::DeleteBackend { .. } => "delete-backend",
    }
}

fn kinds(ops: &[Op]) -> Vec<&'static str> {
    ops.iter().map(kind).collect()
}

#[test]
fn a_new_service_is_written_bottom_up() {
    let mut t = table();
    let mut model = Programmed::new();
    let id = t
        .upsert(
            key(1),
            spec(true, vec![ready(0, 1), ready(0, 2), ready(0, 3)]),
        )
        .unwrap();
    let ops = sync(&mut t, &mut model);
    assert_eq!(
        kinds(&ops),
        [
            "put-backend",
            "put-backend",
            "put-backend",
            "create-ring",
            "put-service"
        ]
    );
    let entry = &model.services()[&key(1)];
    assert_eq!(entry.id, id);
    assert_eq!(entry.flags(), FLAG_PUBLISHED);
    assert_eq!(
        entry.ring,
        Some(RingRef {
            generation: 0,
            size: DEFAULT_TABLE_SIZE
        })
    );
    assert_eq!(entry.backends.len(), 3);
}

#[test]
fn no_change_plans_nothing() {
    let mut t = table();
    let mut model = Programmed::new();
    assert_eq!(plan(&model, &t.desired()), []);
    t.upsert(key(1), spec(true, vec![ready(0, 1), ready(0, 2)]))
        .unwrap();
    t.upsert(key(2), spec(false, vec![ready(0, 2)])).unwrap();
    sync(&mut t, &mut model);
    // The same specs again, in another order.
    t.upsert(key(1), spec(true, vec![ready(0, 2), ready(0, 1)]))
        .unwrap();
    t.set_ready(&key(2), addr(0, 2), true).unwrap();
    assert_eq!(plan(&model, &t.desired()), []);
}

#[test]
fn changing_one_backend_of_one_service_touches_only_that_service() {
    let mut t = table();
    let mut model = Programmed::new();
    let a: Vec<Backend> = (1..=5).map(|i| ready(1, i)).collect();
    let b: Vec<Backend> = (1..=5).map(|i| ready(2, i)).collect();
    let a_id = t.upsert(key(1), spec(true, a.clone())).unwrap();
    t.upsert(key(2), spec(true, b)).unwrap();
    sync(&mut t, &mut model);
    let old = t.backend_id(&addr(1, 3)).unwrap();

    let mut changed = a;
    changed[2] = ready(1, 9);
    t.set_backends(&key(1), changed).unwrap();
    let ops = sync(&mut t, &mut model);
    let new = t.backend_id(&addr(1, 9)).unwrap();
    assert_eq!(
        kinds(&ops),
        [
            "put-backend",
            "put-ring-slots",
            "put-service",
            "delete-backend"
        ]
    );
    for op in &ops {
        let (service, ring, backend) = touches(op);
        assert!(service.is_none_or(|k| k == key(1)), "{op:?}");
        assert!(ring.is_none_or(|r| r.service == a_id), "{op:?}");
        assert!(backend.is_none_or(|b| b == old || b == new), "{op:?}");
    }
    // Only changed slots are written. A replacement is a removal plus an
    // addition: the old backend's fifth of the slots moves, and the new one
    // takes a fifth, mostly elsewhere (Maglev bound: 2·M/N + 2.5 % of M).
    let Op::PutRingSlots { slots, .. } = &ops[1] else {
        panic!("{:?}", ops[1]);
    };
    let m = DEFAULT_TABLE_SIZE as usize;
    assert!(
        slots.len() >= m / 5 && slots.len() <= 2 * m / 5 + m / 40,
        "{}",
        slots.len()
    );
    assert!(slots.iter().all(|&(_, b)| b != old));
}

#[test]
fn a_backend_turning_unready_leaves_the_backends_map_alone() {
    let mut t = table();
    let mut model = Programmed::new();
    t.upsert(key(1), spec(true, vec![ready(0, 1), ready(0, 2)]))
        .unwrap();
    sync(&mut t, &mut model);
    t.set_ready(&key(1), addr(0, 2), false).unwrap();
    let ops = sync(&mut t, &mut model);
    assert_eq!(kinds(&ops), ["put-ring-slots", "put-service"]);
    let only = t.backend_id(&addr(0, 1)).unwrap();
    assert_eq!(model.services()[&key(1)].backends, [only]);
    assert!(model.rings().values().all(|r| r.iter().all(|&b| b == only)));
    // The last one going unready removes the ring; the entry stays, empty,
    // so the data plane still knows the VIP and refuses.
    t.set_ready(&key(1), addr(0, 1), false).unwrap();
    let ops = sync(&mut t, &mut model);
    assert_eq!(kinds(&ops), ["put-service", "delete-ring"]);
    let entry = &model.services()[&key(1)];
    assert_eq!((entry.ring, entry.backends.len()), (None, 0));
    assert_eq!(model.backends().len(), 2);
}

#[test]
fn a_ring_that_changes_size_is_built_aside_and_switched_to() {
    let mut t = table();
    let mut model = Programmed::new();
    let mut backends: Vec<Backend> = (1..=163).map(|i| ready(0, i)).collect();
    let id = t.upsert(key(1), spec(true, backends.clone())).unwrap();
    sync(&mut t, &mut model);
    backends.push(ready(1, 1));
    t.set_backends(&key(1), backends).unwrap();
    let ops = sync(&mut t, &mut model);
    assert_eq!(
        kinds(&ops),
        ["put-backend", "create-ring", "put-service", "delete-ring"]
    );
    let size = table_size_for(164);
    assert_eq!(
        model.services()[&key(1)].ring,
        Some(RingRef {
            generation: 1,
            size
        })
    );
    assert_eq!(
        model.rings().keys().copied().collect::<Vec<_>>(),
        [RingKey {
            service: id,
            generation: 1
        }]
    );
    assert_eq!(
        model.rings().values().next().map(Vec::len),
        Some(size as usize)
    );
}

#[test]
fn a_removed_service_is_deleted_top_down_and_shared_backends_stay() {
    let mut t = table();
    let mut model = Programmed::new();
    t.upsert(key(1), spec(true, vec![ready(0, 1), ready(0, 2)]))
        .unwrap();
    t.upsert(key(2), spec(false, vec![ready(0, 2)])).unwrap();
    sync(&mut t, &mut model);
    let shared = t.backend_id(&addr(0, 2)).unwrap();
    t.remove(&key(1)).unwrap();
    let ops = sync(&mut t, &mut model);
    assert_eq!(
        kinds(&ops),
        ["delete-service", "delete-ring", "delete-backend"]
    );
    assert_eq!(
        model.backends().keys().copied().collect::<Vec<_>>(),
        [shared]
    );
    assert!(model.rings().is_empty());
}

#[test]
fn the_model_refuses_dangling_references() {
    let b1 = BackendId::new(1).unwrap();
    let s1 = ServiceId::new(1).unwrap();
    let ring = RingKey {
        service: s1,
        generation: 0,
    };
    let entry = ServiceEntry {
        id: s1,
        published: true,
        ring: Some(RingRef {
            generation: 0,
            size: 3,
        }),
        backends: vec![b1],
    };
    let mut m = Programmed::new();
    let put = Op::PutService {
        key: key(1),
        entry: entry.clone(),
    };
    assert_eq!(m.apply(&put), Err(ModelError::MissingBackend { id: b1 }));
    m.apply(&Op::PutBackend {
        id: b1,
        addr: addr(0, 1),
    })
    .unwrap();
    assert_eq!(m.apply(&put), Err(ModelError::MissingRing { ring }));
    let slots: Arc<[BackendId]> = vec![b1; 5].into();
    m.apply(&Op::CreateRing { ring, slots }).unwrap();
    assert!(matches!(
        m.apply(&put),
        Err(ModelError::RingSizeMismatch { .. })
    ));
    let slots: Arc<[BackendId]> = vec![b1; 3].into();
    m.apply(&Op::CreateRing { ring, slots }).unwrap();
    m.apply(&put).unwrap();
    let before = m.clone();
    assert_eq!(
        m.apply(&Op::DeleteBackend { id: b1 }),
        Err(ModelError::BackendInUse { id: b1, refs: 4 })
    );
    assert_eq!(
        m.apply(&Op::DeleteRing { ring }),
        Err(ModelError::RingInUse { ring })
    );
    assert!(matches!(
        m.apply(&Op::PutRingSlots {
            ring,
            slots: vec![(3, b1)]
        }),
        Err(ModelError::SlotOutOfRange { slot: 3, .. })
    ));
    assert!(matches!(
        m.apply(&Op::PutService {
            key: key(2),
            entry: ServiceEntry {
                ring: None,
                ..entry
            }
        }),
        Err(ModelError::DuplicateServiceId { .. })
    ));
    assert!(matches!(
        m.apply(&Op::PutBackend {
            id: b1,
            addr: addr(0, 7)
        }),
        Err(ModelError::BackendInUse { .. })
    ));
    assert_eq!(m, before, "refused operations changed the model");
    // Top-down, everything goes.
    m.apply_all(&[
        Op::DeleteService { key: key(1) },
        Op::DeleteRing { ring },
        Op::DeleteBackend { id: b1 },
    ])
    .unwrap();
    assert_eq!(m, Programmed::new());
}

#[test]
fn an_adopted_table_reprograms_nothing() {
    let mut t = table();
    let mut model = Programmed::new();
    let specs = [
        (key(1), spec(true, vec![ready(0, 1), weighted(0, 2, 3)])),
        (key(2), spec(false, vec![ready(0, 2), ready(0, 3)])),
        (key(3), spec(true, (1..=170).map(|i| ready(1, i)).collect())),
    ];
    for (k, s) in specs.clone() {
        t.upsert(k, s).unwrap();
    }
    // A resize, so that a ring sits at generation 1.
    t.set_ready(&key(3), addr(1, 100), false).unwrap();
    t.set_backends(&key(3), (1..=150).map(|i| ready(1, i)).collect())
        .unwrap();
    sync(&mut t, &mut model);
    t.set_backends(&key(3), (1..=170).map(|i| ready(1, i)).collect())
        .unwrap();
    sync(&mut t, &mut model);
    assert!(model.services()[&key(3)]
        .ring
        .is_some_and(|r| r.generation == 1));

    // The agent restarts: same maps, a fresh table told the same services
    // (in another order).
    let mut fresh = ServiceTable::adopt(Limits::default(), &model).unwrap();
    for (k, s) in specs.into_iter().rev() {
        fresh.upsert(k, s).unwrap();
    }
    assert_eq!(plan(&model, &fresh.desired()), []);
    assert_eq!(plan_changes(&model, &fresh), []);
    // Something the maps held that is not declared again is removed, and
    // its ids are freed once that is programmed.
    let mut t2 = ServiceTable::adopt(Limits::default(), &model).unwrap();
    t2.upsert(key(2), spec(false, vec![ready(0, 2), ready(0, 3)]))
        .unwrap();
    let ops = sync(&mut t2, &mut model);
    assert!(ops.contains(&Op::DeleteService { key: key(1) }));
    assert_eq!(t2.id_usage(), (1, 0, 2, 0));
}

#[test]
fn adopting_maps_made_for_larger_limits_is_refused() {
    let mut t = table();
    let mut model = Programmed::new();
    for i in 1..=3 {
        t.upsert(key(i), spec(false, vec![ready(0, i)])).unwrap();
    }
    sync(&mut t, &mut model);
    let small = Limits {
        max_services: 2,
        max_published_services: 2,
        ..Limits::default()
    };
    let err = ServiceTable::adopt(small, &model).unwrap_err();
    assert!(
        err.to_string()
            .contains("service id 3, above the limit of 2"),
        "{err}"
    );
}

/// A change to the table, from a small universe so that changes collide.
#[derive(Debug, Clone)]
enum Change {
    Upsert {
        service: u8,
        published: bool,
        backends: Vec<(u8, u16, bool)>,
    },
    Remove {
        service: u8,
    },
    Ready {
        service: u8,
        backend: u8,
        ready: bool,
    },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (
            1u8..=6,
            any::<bool>(),
            proptest::collection::btree_map(0u8..24, (1u16..=3, proptest::bool::weighted(0.8)), 0..8),
        )
            .prop_map(|(service, published, backends)| Change::Upsert {
                service,
                published,
                backends: backends.into_iter().map(|(b, (w, r))| (b, w, r)).collect(),
            }),
        1 => (1u8..=6).prop_map(|service| Change::Remove { service }),
        2 => (1u8..=6, 0u8..24, any::<bool>())
            .prop_map(|(service, backend, ready)| Change::Ready { service, backend, ready }),
    ]
}

/// Applies a change; errors (unknown service, full table) are fine, they
/// must just leave the table consistent.
fn apply_change(t: &mut ServiceTable, c: &Change) {
    let _ = match c {
        Change::Upsert {
            service,
            published,
            backends,
        } => t
            .upsert(
                key(*service),
                spec(
                    *published,
                    backends
                        .iter()
                        .map(|&(b, w, r)| Backend {
                            weight: Weight::new(w).unwrap(),
                            ready: r,
                            ..ready(0, b)
                        })
                        .collect(),
                ),
            )
            .map(|_| ()),
        Change::Remove { service } => t.remove(&key(*service)).map(|_| ()),
        Change::Ready {
            service,
            backend,
            ready,
        } => t.set_ready(&key(*service), addr(0, *backend), *ready),
    };
}

/// Every id a model refers to, for "ids are not reused while held".
fn held(m: &Programmed) -> (BTreeSet<ServiceId>, BTreeSet<BackendId>) {
    let services = m
        .services()
        .values()
        .map(|e| e.id)
        .chain(m.rings().keys().map(|r| r.service))
        .collect();
    (services, m.backends().keys().copied().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random batches of changes, each programmed with a plan that may be
    /// cut short (a failed write): every operation of every plan is
    /// accepted by the model (no dangling reference at any point), the
    /// final state is exactly the desired one, planning again is empty, and
    /// no id is handed to something else while the maps still hold it.
    #[test]
    fn plans_converge_safely_even_when_cut_short(
        batches in proptest::collection::vec(
            (proptest::collection::vec(change(), 1..5), any::<prop::sample::Index>(), any::<bool>()),
            1..12,
        ),
    ) {
        let limits = Limits {
            max_services: 5,
            max_backends: 20,
            max_backends_per_service: 6,
            max_published_services: 3,
        };
        let mut t = ServiceTable::new(limits).unwrap();
        let mut model = Programmed::new();
        for (changes, cut, cut_short) in &batches {
            let (held_services, held_backends) = held(&model);
            for c in changes {
                apply_change(&mut t, c);
            }
            let desired = t.desired();
            // Ids held by the maps keep their meaning.
            for (key, s) in desired.services() {
                if held_services.contains(&s.id) {
                    let was = model.services().iter().find(|(_, e)| e.id == s.id).map(|(k, _)| *k);
                    prop_assert!(was.is_none_or(|k| k == *key), "service id {} moved from {:?} to {}", s.id, was, key);
                }
            }
            for (id, addr) in desired.backends() {
                if held_backends.contains(id) {
                    prop_assert_eq!(model.backends().get(id), Some(addr));
                }
            }
            let ops = plan(&model, &desired);
            if *cut_short && !ops.is_empty() {
                // The agent applied a prefix and then a write failed.
                let n = cut.index(ops.len());
                if let Err((i, e)) = model.apply_all(&ops[..n]) {
                    prop_assert!(false, "op {} {:?} refused: {}", i, ops[i], e);
                }
                t.release(&model);
            }
            let ops = plan(&model, &desired);
            for op in &ops {
                if let Err(e) = model.apply(op) {
                    prop_assert!(false, "op {:?} refused: {}", op, e);
                }
                // Maps sized to the limits never overflow, at any point.
                prop_assert!(model.services().len() <= limits.max_services as usize);
                prop_assert!(model.backends().len() <= limits.max_backends as usize);
                prop_assert!(model.rings().len() <= 2 * limits.max_services as usize);
            }
            prop_assert!(model.satisfies(&desired));
            prop_assert_eq!(plan(&model, &desired), vec![]);
            t.release(&model);
        }
        // Everything removed: the maps end empty and every id is free.
        let keys: Vec<ServiceKey> = (1..=6).map(key).filter(|k| t.service_id(k).is_some()).collect();
        for k in keys {
            t.remove(&k).unwrap();
        }
        sync(&mut t, &mut model);
        prop_assert_eq!(&model, &Programmed::new());
        prop_assert_eq!(t.id_usage(), (0, 0, 0, 0));
    }

    /// A plan touches only the services that changed.
    #[test]
    fn a_plan_touches_only_changed_services(
        first in proptest::collection::vec(change(), 1..8),
        change in change(),
    ) {
        let mut t = table();
        let mut model = Programmed::new();
        for c in &first {
            apply_change(&mut t, c);
        }
        sync(&mut t, &mut model);
        let before = t.desired();
        apply_change(&mut t, &change);
        let after = t.desired();
        let ops = plan(&model, &after);
        let changed_ids: BTreeSet<ServiceId> = before
            .services()
            .iter()
            .chain(after.services())
            .filter(|(k, _)| before.services().get(k) != after.services().get(k))
            .map(|(_, s)| s.id)
            .collect();
        for op in &ops {
            let (service, ring, _) = touches(op);
            if let Some(k) = service {
                prop_assert!(before.services().get(&k) != after.services().get(&k), "{:?}", op);
            }
            if let Some(r) = ring {
                prop_assert!(changed_ids.contains(&r.service), "{:?}", op);
            }
        }
    }

    /// The incremental plan is the full plan, operation for operation, at
    /// every step of random batches of changes, with plans cut short (a
    /// failed write, then a release) and agent restarts (a table adopted
    /// from the maps as they are, maybe half-programmed, told all but maybe
    /// one of the services again), so it
    /// reaches exactly the same maps through the same safe prefixes.
    #[test]
    fn incremental_plans_are_the_full_plans(
        batches in proptest::collection::vec(
            (
                proptest::collection::vec(change(), 1..5),
                any::<prop::sample::Index>(),
                any::<bool>(),
                proptest::bool::weighted(0.15),
                any::<prop::sample::Index>(),
            ),
            1..16,
        ),
    ) {
        let limits = Limits {
            max_services: 5,
            max_backends: 20,
            max_backends_per_service: 6,
            max_published_services: 3,
        };
        let mut t = ServiceTable::new(limits).unwrap();
        let mut model = Programmed::new();
        for (changes, cut, cut_short, restart, keep) in &batches {
            for c in changes {
                apply_change(&mut t, c);
            }
            let ops = plan_changes(&model, &t);
            prop_assert_eq!(&ops, &plan(&model, &t.desired()));
            if *cut_short && !ops.is_empty() {
                let n = cut.index(ops.len());
                if let Err((i, e)) = model.apply_all(&ops[..n]) {
                    prop_assert!(false, "op {} {:?} refused: {}", i, ops[i], e);
                }
                t.release(&model);
                prop_assert_eq!(plan_changes(&model, &t), plan(&model, &t.desired()));
            }
            if *restart {
                // The agent restarts (maybe half-way through a plan) and
                // is told again every service but (maybe) one, in another
                // order.
                let mut fresh = ServiceTable::adopt(limits, &model).unwrap();
                let keys: Vec<ServiceKey> = t.keys().copied().collect();
                let skip = (!keys.is_empty()).then(|| keys[keep.index(keys.len())]);
                for k in keys.iter().rev().filter(|k| Some(**k) != skip) {
                    let spec = t.spec(k).unwrap();
                    // A full table may refuse one: a ring built for a
                    // service whose entry was not written yet holds an id
                    // no key leads the adopted table to, until a plan
                    // deletes it and a release frees the id. The agent
                    // logs the refusal and retries with the next message.
                    let _ = fresh.upsert(*k, spec);
                }
                t = fresh;
            }
            let ops = plan_changes(&model, &t);
            prop_assert_eq!(&ops, &plan(&model, &t.desired()));
            for op in &ops {
                if let Err(e) = model.apply(op) {
                    prop_assert!(false, "op {:?} refused: {}", op, e);
                }
            }
            prop_assert!(model.satisfies(&t.desired()));
            t.release(&model);
            prop_assert_eq!(t.unprogrammed_changes(), 0);
            prop_assert_eq!(plan_changes(&model, &t), vec![]);
        }
    }
}
