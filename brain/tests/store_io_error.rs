//! The store recovers from an I/O error. redb latches one: every later
//! operation fails ("previous I/O error") until the database is closed and
//! opened again, so without a reopen a disk that filled once would refuse
//! every write of the brain until it restarted.
//!
//! A file size limit (`RLIMIT_FSIZE`, with SIGXFSZ ignored) makes the
//! store's file unable to grow, as a full disk does, without root. It is
//! process-wide: this file holds one test, so its binary runs nothing else.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral_brain::desired::{AppKey, NewApp, Placement, Workload};
use corral_brain::store::{Expect, Op, RedbStore, Store, StoreError};
use corral_proto::{AppId, CellId, InstanceId, TenantId, Timestamp};

fn set_file_size_limit(bytes: u64) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain system calls on this process, with a valid struct.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
}

/// A commit of `n` placements with long ids: enough to grow the file.
fn placements(from: usize, n: usize) -> Vec<Op> {
    (from..from + n)
        .map(|i| Op::PutPlacement {
            placement: Placement {
                instance: InstanceId::new(format!("web-{i}-{}", "x".repeat(40))).unwrap(),
                cell: CellId::new("cell-1").unwrap(),
                tenant: TenantId::new("acme").unwrap(),
                workload: Workload::Lrp {
                    app: AppId::new("web").unwrap(),
                    index: u32::try_from(i).unwrap(),
                    version: 1,
                },
                since: Timestamp(1),
                revision: 0,
            },
            expect: Expect::Any,
        })
        .collect()
}

#[test]
fn after_an_io_error_the_store_reopens_and_writes_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("brain.redb");
    let store = RedbStore::open(&path).unwrap();
    let app = serde_json::from_value::<NewApp>(serde_json::json!({
        "name": "web", "instances": 1, "rootfs": "/r", "command": ["x"],
        "resources": {"memory_mb": 8},
    }))
    .unwrap()
    .into_app(TenantId::new("acme").unwrap(), Timestamp(1))
    .unwrap();
    store
        .commit(vec![Op::PutApp {
            app,
            expect: Expect::Absent,
        }])
        .unwrap();
    let before = store.revision().unwrap();

    // The file cannot grow: commits fail with an I/O error.
    let size = std::fs::metadata(&path).unwrap().len();
    set_file_size_limit(size);
    let mut failed = None;
    for round in 0..200 {
        if let Err(e) = store.commit(placements(round * 500, 500)) {
            failed = Some(e);
            break;
        }
    }
    set_file_size_limit(libc::RLIM_INFINITY);
    let failed = failed.expect("no commit failed with the file unable to grow");
    assert!(
        matches!(failed, StoreError::Backend { .. }),
        "not an I/O error: {failed}"
    );
    eprintln!("with the file unable to grow: {failed}");

    // Room again: the store writes and reads as before, and nothing
    // acknowledged was lost.
    let rev = store.commit(placements(1_000_000, 10)).unwrap();
    assert!(rev > before, "{rev} after {before}");
    let key = AppKey {
        tenant: TenantId::new("acme").unwrap(),
        name: AppId::new("web").unwrap(),
    };
    let apps = store.snapshot().unwrap().apps;
    assert_eq!(apps.len(), 1);
    assert_eq!((apps[0].key(), apps[0].revision), (key, 1));
    drop(store);
    // And the file opens again afterwards, with the last commit in it.
    let again = RedbStore::open(&path).unwrap();
    assert_eq!(again.revision().unwrap(), rev);
}
