//! Helpers shared by the unit tests.

use std::net::Ipv4Addr;

use corral_proto::{AppId, TenantId};

use crate::{
    plan, plan_changes, Backend, BackendAddr, Limits, Programmed, Protocol, ServiceKey,
    ServiceOwner, ServiceSpec, ServiceTable, Weight,
};

/// Service `n`: VIP 10.96.0.n, port 80, TCP.
pub(crate) fn key(n: u8) -> ServiceKey {
    ServiceKey {
        vip: Ipv4Addr::new(10, 96, 0, n),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

/// Backend address 10.0.a.b:8080.
pub(crate) fn addr(a: u8, b: u8) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::new(10, 0, a, b),
        port: 8080,
    }
}

/// A ready backend of weight 1.
pub(crate) fn ready(a: u8, b: u8) -> Backend {
    Backend {
        addr: addr(a, b),
        weight: Weight::ONE,
        ready: true,
    }
}

pub(crate) fn weighted(a: u8, b: u8, w: u16) -> Backend {
    Backend {
        weight: Weight::new(w).unwrap(),
        ..ready(a, b)
    }
}

pub(crate) fn owner() -> ServiceOwner {
    ServiceOwner {
        tenant: TenantId::new("acme").unwrap(),
        app: AppId::new("web").unwrap(),
    }
}

pub(crate) fn spec(published: bool, backends: Vec<Backend>) -> ServiceSpec {
    ServiceSpec {
        owner: owner(),
        published,
        backends,
    }
}

pub(crate) fn table() -> ServiceTable {
    ServiceTable::new(Limits::default()).unwrap()
}

/// Plans, applies every operation to the model (each must be accepted),
/// checks the result and that planning again finds nothing, releases ids.
/// The incremental plan must be the full one exactly, and be empty after
/// the release. Returns the operations.
pub(crate) fn sync(table: &mut ServiceTable, model: &mut Programmed) -> Vec<crate::Op> {
    let desired = table.desired();
    let ops = plan(model, &desired);
    assert_eq!(plan_changes(model, table), ops, "incremental plan differs");
    if let Err((i, e)) = model.apply_all(&ops) {
        panic!("op {i} ({:?}) refused: {e}", ops[i]);
    }
    assert!(model.satisfies(&desired), "model does not match desired");
    assert_eq!(plan(model, &desired), [], "a second plan is not empty");
    table.release(model);
    assert_eq!(
        table.unprogrammed_changes(),
        0,
        "changes left after release"
    );
    ops
}
