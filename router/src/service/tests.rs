use std::collections::BTreeMap;

use super::*;
use crate::maglev::{populate, table_size_for, Entry};
use crate::testing::*;

fn model_free_id(n: u32) -> BackendId {
    BackendId::new(n).unwrap()
}

fn small(services: u32, backends: u32, per_service: u32) -> ServiceTable {
    ServiceTable::new(Limits {
        max_services: services,
        max_backends: backends,
        max_backends_per_service: per_service,
        max_published_services: services.min(1),
    })
    .unwrap()
}

#[test]
fn limits_are_checked() {
    for bad in [
        Limits {
            max_services: 0,
            ..Limits::default()
        },
        Limits {
            max_backends_per_service: MAX_BACKENDS_PER_SERVICE + 1,
            ..Limits::default()
        },
        Limits {
            max_services: 10,
            max_published_services: 11,
            ..Limits::default()
        },
    ] {
        assert!(matches!(
            ServiceTable::new(bad),
            Err(Error::InvalidLimits { .. })
        ));
    }
}

#[test]
fn ids_are_stable_and_shared_backends_have_one() {
    let mut t = table();
    let a = t
        .upsert(key(1), spec(false, vec![ready(0, 1), ready(0, 2)]))
        .unwrap();
    let b = t
        .upsert(key(2), spec(false, vec![ready(0, 2), ready(0, 3)]))
        .unwrap();
    assert_ne!(a, b);
    let shared = t.backend_id(&addr(0, 2)).unwrap();
    // Upserting again (other backends, other order) keeps the service id
    // and the ids of the backends that stay.
    let again = t
        .upsert(key(1), spec(true, vec![ready(0, 4), ready(0, 2)]))
        .unwrap();
    assert_eq!(again, a);
    assert_eq!(t.backend_id(&addr(0, 2)), Some(shared));
    assert_eq!(t.backend_id(&addr(0, 1)), None);
    // 0.1 is pending, 0.2, 0.3, 0.4 live.
    assert_eq!(t.id_usage(), (2, 0, 3, 1));
}

#[test]
fn malformed_input_is_refused_and_changes_nothing() {
    let mut t = table();
    t.upsert(key(1), spec(true, vec![ready(0, 1)])).unwrap();
    let before = t.desired();
    let bad_port = Backend {
        addr: BackendAddr {
            port: 0,
            ..addr(0, 9)
        },
        ..ready(0, 9)
    };
    let err = t
        .upsert(key(1), spec(true, vec![ready(0, 2), bad_port]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid backend 10.0.0.9:0 of service 10.96.0.1:80/tcp: port 0"
    );
    let err = t
        .upsert(key(1), spec(true, vec![ready(0, 2), ready(0, 2)]))
        .unwrap_err();
    assert_eq!(
        err,
        Error::DuplicateBackend {
            key: key(1),
            backend: addr(0, 2)
        }
    );
    let zero_vip = ServiceKey {
        vip: Ipv4Addr::UNSPECIFIED,
        ..key(1)
    };
    assert!(matches!(
        t.upsert(zero_vip, spec(false, vec![])),
        Err(Error::InvalidService { .. })
    ));
    // 0.0.0.0 is "an address of this node": a published port's key.
    let published_port = t.upsert(zero_vip, spec(true, vec![ready(1, 1)])).unwrap();
    assert_eq!(t.service_id(&zero_vip), Some(published_port));
    assert!(t.desired().services()[&zero_vip].ring.is_some());
    t.remove(&zero_vip).unwrap();
    assert_eq!(
        t.set_backends(&key(7), vec![]),
        Err(Error::UnknownService { key: key(7) })
    );
    assert_eq!(
        t.set_ready(&key(1), addr(0, 5), false),
        Err(Error::UnknownBackend {
            key: key(1),
            backend: addr(0, 5)
        })
    );
    assert_eq!(t.desired(), before);
}

#[test]
fn a_full_service_table_is_a_clear_error_that_disturbs_nobody() {
    let mut t = small(2, 100, 8);
    t.upsert(key(1), spec(true, vec![ready(0, 1)])).unwrap();
    t.upsert(key(2), spec(false, vec![ready(0, 2)])).unwrap();
    let before = t.desired();
    let err = t
        .upsert(key(3), spec(false, vec![ready(0, 3)]))
        .unwrap_err();
    assert_eq!(
        err,
        Error::ServicesFull {
            key: key(3),
            limit: 2,
            pending: 0
        }
    );
    assert!(err.to_string().starts_with(
        "cannot add service 10.96.0.3:80/tcp: service table full (2 ids, 0 of them waiting"
    ));
    assert_eq!(t.desired(), before);
    // Updating an existing service still works at the limit.
    t.set_backends(&key(2), vec![ready(0, 2), ready(0, 4)])
        .unwrap();
}

#[test]
fn a_full_backend_table_is_a_clear_error_that_disturbs_nobody() {
    let mut t = small(10, 3, 8);
    t.upsert(key(1), spec(true, vec![ready(0, 1), ready(0, 2)]))
        .unwrap();
    let before = t.desired();
    let err = t
        .upsert(
            key(2),
            spec(false, vec![ready(0, 2), ready(0, 3), ready(0, 4)]),
        )
        .unwrap_err();
    assert_eq!(
        err,
        Error::BackendsFull {
            key: key(2),
            needed: 2,
            available: 1,
            limit: 3,
            pending: 0
        }
    );
    assert_eq!(t.desired(), before);
    assert_eq!(t.service_id(&key(2)), None);
    // A shared address costs nothing.
    t.upsert(key(2), spec(false, vec![ready(0, 1), ready(0, 3)]))
        .unwrap();
}

#[test]
fn published_services_are_limited() {
    let mut t = small(3, 10, 4);
    t.upsert(key(1), spec(true, vec![ready(0, 1)])).unwrap();
    t.upsert(key(2), spec(false, vec![ready(0, 1)])).unwrap();
    let before = t.desired();
    assert_eq!(
        t.upsert(key(2), spec(true, vec![ready(0, 1)])),
        Err(Error::PublishedFull {
            key: key(2),
            limit: 1
        })
    );
    assert_eq!(t.desired(), before);
    // Unpublishing makes room; changing the published one needs none.
    t.upsert(key(1), spec(true, vec![ready(0, 2)])).unwrap();
    t.upsert(key(1), spec(false, vec![ready(0, 2)])).unwrap();
    t.upsert(key(2), spec(true, vec![ready(0, 1)])).unwrap();
}

#[test]
fn too_many_backends_for_one_service_is_refused() {
    let mut t = small(10, 100, 2);
    let err = t
        .upsert(
            key(1),
            spec(false, vec![ready(0, 1), ready(0, 2), ready(0, 3)]),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "service 10.96.0.1:80/tcp lists 3 backends, more than the limit of 2 per service"
    );
    assert!(t.is_empty());
}

#[test]
fn readiness_changes_never_need_room() {
    // Every id in use: flipping readiness must still work, because ids are
    // held by listed backends, ready or not.
    let mut t = small(1, 2, 2);
    t.upsert(
        key(1),
        spec(
            true,
            vec![
                Backend {
                    ready: false,
                    ..ready(0, 1)
                },
                ready(0, 2),
            ],
        ),
    )
    .unwrap();
    t.set_ready(&key(1), addr(0, 1), true).unwrap();
    t.set_ready(&key(1), addr(0, 2), false).unwrap();
    let d = t.desired();
    let s = &d.services()[&key(1)];
    assert_eq!(s.backends, [t.backend_id(&addr(0, 1)).unwrap()]);
}

#[test]
fn removed_ids_are_reused_only_after_release_oldest_first() {
    let mut t = small(3, 100, 8);
    let mut model = Programmed::new();
    let a = t.upsert(key(1), spec(false, vec![ready(0, 1)])).unwrap();
    let b = t.upsert(key(2), spec(false, vec![ready(0, 2)])).unwrap();
    let c = t.upsert(key(3), spec(false, vec![ready(0, 3)])).unwrap();
    sync(&mut t, &mut model);
    t.remove(&key(2)).unwrap();
    // Not programmed yet: the id is pending and counts as used.
    let err = t.upsert(key(4), spec(false, vec![])).unwrap_err();
    assert!(
        matches!(err, Error::ServicesFull { pending: 1, .. }),
        "{err}"
    );
    // Releasing against a model that still holds it frees nothing.
    t.release(&model);
    assert!(t.upsert(key(4), spec(false, vec![])).is_err());
    // Programmed and released: free. Then 1 goes the same way.
    sync(&mut t, &mut model);
    t.remove(&key(1)).unwrap();
    sync(&mut t, &mut model);
    // Oldest-freed first.
    assert_eq!(t.upsert(key(4), spec(false, vec![])).unwrap(), b);
    assert_eq!(t.upsert(key(5), spec(false, vec![])).unwrap(), a);
    assert_eq!(t.service_id(&key(3)), Some(c));
    // Backend ids of 0.1 and 0.2 were released too: a new address gets
    // one of them, not a fresh id.
    let freed = [model_free_id(1), model_free_id(2)];
    t.upsert(key(4), spec(false, vec![ready(0, 9)])).unwrap();
    assert!(freed.contains(&t.backend_id(&addr(0, 9)).unwrap()));
}

#[test]
fn a_key_that_returns_before_release_gets_its_old_ids() {
    let mut t = table();
    let mut model = Programmed::new();
    let id = t.upsert(key(1), spec(true, vec![ready(0, 1)])).unwrap();
    let backend = t.backend_id(&addr(0, 1)).unwrap();
    sync(&mut t, &mut model);
    t.remove(&key(1)).unwrap();
    assert_eq!(t.upsert(key(1), spec(true, vec![ready(0, 1)])).unwrap(), id);
    assert_eq!(t.backend_id(&addr(0, 1)), Some(backend));
    // Nothing to program: it is exactly what the maps hold.
    assert_eq!(sync(&mut t, &mut model), []);
}

#[test]
fn the_ring_is_maglev_over_the_ready_backends() {
    let mut t = table();
    let backends = vec![
        weighted(0, 3, 2),
        ready(0, 1),
        Backend {
            ready: false,
            ..ready(0, 2)
        },
    ];
    t.upsert(key(1), spec(true, backends)).unwrap();
    let d = t.desired();
    let ring = d.services()[&key(1)].ring.clone().unwrap();
    // Expected: Maglev over 0.1 (weight 1) and 0.3 (weight 2), by address.
    let entries = [
        Entry {
            key: addr(0, 1).maglev_key(),
            weight: Weight::ONE,
        },
        Entry {
            key: addr(0, 3).maglev_key(),
            weight: Weight::new(2).unwrap(),
        },
    ];
    let table = populate(&entries, table_size_for(2)).unwrap().unwrap();
    let ids = [
        t.backend_id(&addr(0, 1)).unwrap(),
        t.backend_id(&addr(0, 3)).unwrap(),
    ];
    let want: Vec<BackendId> = table.slots().iter().map(|&i| ids[i as usize]).collect();
    assert_eq!(&ring[..], &want[..]);
    // Not published: no ring. No ready backend: no ring either.
    t.upsert(key(2), spec(false, vec![ready(0, 1)])).unwrap();
    t.upsert(
        key(3),
        spec(
            true,
            vec![Backend {
                ready: false,
                ..ready(0, 1)
            }],
        ),
    )
    .unwrap();
    let d = t.desired();
    assert_eq!(d.services()[&key(2)].ring, None);
    assert_eq!(d.services()[&key(3)].ring, None);
    assert_eq!(d.services()[&key(3)].backends, []);
}

#[test]
fn east_west_lists_honour_weights() {
    let mut t = table();
    t.upsert(key(1), spec(false, vec![ready(0, 2), ready(0, 1)]))
        .unwrap();
    let d = t.desired();
    let ids = [
        t.backend_id(&addr(0, 1)).unwrap(),
        t.backend_id(&addr(0, 2)).unwrap(),
    ];
    assert_eq!(d.services()[&key(1)].backends, ids);

    t.set_backends(
        &key(1),
        vec![weighted(0, 1, 1), weighted(0, 2, 3), weighted(0, 3, 4)],
    )
    .unwrap();
    let d = t.desired();
    let list = &d.services()[&key(1)].backends;
    assert_eq!(list.len(), MAX_BACKENDS_PER_SERVICE as usize);
    let mut counts: BTreeMap<BackendId, usize> = BTreeMap::new();
    for id in list {
        *counts.entry(*id).or_default() += 1;
    }
    let count = |b| counts[&t.backend_id(&addr(0, b)).unwrap()];
    // 256 · 1/8, 3/8, 4/8 (after one slot each: 1 + 253 · w/8).
    assert_eq!((count(1), count(2), count(3)), (33, 96, 127));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    #[test]
    fn weighted_east_west_lists_are_proportional(
        weights in proptest::collection::vec(1u16..=1000, 2..=40),
    ) {
        let ready: Vec<(BackendId, Weight)> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (BackendId::new(i as u32 + 1).unwrap(), Weight::new(w).unwrap()))
            .collect();
        let list = east_west(&ready);
        let slots = MAX_BACKENDS_PER_SERVICE as usize;
        if weights.iter().all(|&w| w == weights[0]) {
            proptest::prop_assert_eq!(list.len(), weights.len());
        } else {
            proptest::prop_assert_eq!(list.len(), slots);
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            let spare = (slots - weights.len()) as f64;
            for (id, w) in &ready {
                let c = list.iter().filter(|x| *x == id).count() as f64;
                // One guaranteed slot plus the weighted share, rounded.
                let want = 1.0 + spare * f64::from(w.get()) / total;
                proptest::prop_assert!((c - want).abs() < 1.0, "{} vs {}", c, want);
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Two cells that reach the same services by different histories (other
    /// ids, other orders) build rings that send every slot to the same
    /// backend address: what lets ECMP send a flow to any node.
    #[test]
    fn rings_agree_across_cells_whatever_their_history(
        services in proptest::collection::btree_map(
            1u8..=5,
            proptest::collection::btree_map(0u8..30, (1u16..=4, proptest::bool::weighted(0.8)), 1..10),
            1..5,
        ),
        noise in proptest::collection::vec(0u8..30, 0..10),
    ) {
        let as_backends = |m: &BTreeMap<u8, (u16, bool)>| -> Vec<Backend> {
            m.iter()
                .map(|(&b, &(w, r))| Backend { weight: Weight::new(w).unwrap(), ready: r, ..ready(0, b) })
                .collect()
        };
        let mut a = table();
        for (&s, m) in &services {
            a.upsert(key(s), spec(true, as_backends(m))).unwrap();
        }
        // The other cell saw other services and backends come and go first,
        // and the services in reverse order with reversed backend lists.
        let mut b = table();
        let noise: BTreeSet<u8> = noise.into_iter().collect();
        b.upsert(key(9), spec(true, noise.iter().map(|&n| ready(1, n)).collect())).unwrap();
        for (&s, m) in services.iter().rev() {
            let mut list = as_backends(m);
            list.reverse();
            b.upsert(key(s), spec(true, list)).unwrap();
        }
        b.remove(&key(9)).ok();
        let addrs = |t: &ServiceTable| -> BTreeMap<ServiceKey, Option<Vec<BackendAddr>>> {
            let d = t.desired();
            d.services()
                .iter()
                .map(|(k, s)| {
                    let ring = s.ring.as_ref().map(|r| r.iter().map(|id| d.backends()[id]).collect());
                    (*k, ring)
                })
                .collect()
        };
        proptest::prop_assert_eq!(addrs(&a), addrs(&b));
    }
}
