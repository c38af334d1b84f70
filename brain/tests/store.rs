//! The embedded store: durability across close and reopen, all-or-nothing
//! commits, compare-and-swap, concurrent readers, and clear errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral_brain::desired::{
    App, AppKey, CrashKey, NewApp, NewTask, Placement, Task, TaskId, TaskState, Workload,
};
use corral_brain::store::{
    give_missing_vips, Expect, Op, RedbStore, Store, StoreError, SCHEMA_VERSION,
};
use corral_proto::{AppId, CellId, InstanceId, TenantId, Timestamp};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn app(t: &str, name: &str) -> App {
    serde_json::from_value::<NewApp>(serde_json::json!({
        "name": name, "instances": 2, "rootfs": "/srv/rootfs/busybox",
        "command": ["/bin/httpd", "-f"], "env": {"A": "1"},
        "resources": {"memory_mb": 64}, "ports": [8080], "tags": ["ssd"],
    }))
    .unwrap()
    .into_app(tenant(t), Timestamp(1_000))
    .unwrap()
}

fn task(t: &str, n: u64) -> Task {
    serde_json::from_value::<NewTask>(serde_json::json!({
        "rootfs": "/srv/rootfs/busybox", "command": ["/bin/true"],
        "resources": {"memory_mb": 16},
    }))
    .unwrap()
    .into_task(
        TaskId::from_entropy(n).unwrap(),
        tenant(t),
        Timestamp(2_000),
    )
    .unwrap()
}

fn placement(instance: &str, t: &str, name: &str, index: u32) -> Placement {
    Placement {
        instance: InstanceId::new(instance).unwrap(),
        cell: CellId::new("cell-1").unwrap(),
        tenant: tenant(t),
        workload: Workload::Lrp {
            app: AppId::new(name).unwrap(),
            index,
            version: 1,
        },
        since: Timestamp(3_000),
        revision: 0,
    }
}

fn crash_key(t: &str, name: &str, index: u32) -> CrashKey {
    CrashKey {
        tenant: tenant(t),
        app: AppId::new(name).unwrap(),
        index,
    }
}

fn key(t: &str, name: &str) -> AppKey {
    AppKey {
        tenant: tenant(t),
        name: AppId::new(name).unwrap(),
    }
}

fn fill(s: &dyn Store) {
    s.create_app(app("acme", "web"), None).unwrap();
    s.create_app(app("acme", "worker"), None).unwrap();
    s.create_app(app("beta", "web"), None).unwrap();
    let mut t = s.create_task(task("acme", 1)).unwrap();
    let expected = t.revision;
    t.transition(
        TaskState::Running,
        Some(CellId::new("cell-1").unwrap()),
        None,
        Timestamp(2_500),
    )
    .unwrap();
    s.replace_task(t, expected).unwrap();
    s.place(placement("web-0", "acme", "web", 0)).unwrap();
    s.place(placement("web-1", "acme", "web", 1)).unwrap();
    s.record_crash(
        &crash_key("acme", "web", 1),
        Timestamp(4_000),
        "exited with code 1",
    )
    .unwrap();
    s.record_crash(
        &crash_key("acme", "web", 1),
        Timestamp(5_000),
        "out of memory",
    )
    .unwrap();
}

#[test]
fn everything_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/brain.redb");
    let before = {
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.revision().unwrap(), 0, "a new store starts at revision 0");
        fill(&s);
        s.snapshot().unwrap()
    };
    assert_eq!(before.revision, 9);
    assert_eq!(before.apps.len(), 3);
    assert_eq!(before.tasks.len(), 1);
    assert_eq!(before.placements.len(), 2);
    assert_eq!(before.crashes.len(), 1);
    assert_eq!(before.crashes[0].count, 2);
    assert_eq!(before.crashes[0].last_reason, "out of memory");
    assert_eq!(before.tasks[0].state, TaskState::Running);

    let s = RedbStore::open(&path).unwrap();
    let after = s.snapshot().unwrap();
    assert_eq!(after, before);
    assert_eq!(s.app(&key("acme", "web")).unwrap().unwrap(), before.apps[0]);
    // The revision goes on from where it was.
    let next = s.create_app(app("acme", "new"), None).unwrap();
    assert_eq!(next.revision, 10);
}

#[test]
fn records_carry_the_revision_of_their_last_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("s.redb")).unwrap();
    let a = s.create_app(app("acme", "web"), None).unwrap();
    assert_eq!(a.revision, 1);
    assert_eq!(s.app(&a.key()).unwrap().unwrap().revision, 1);
    let mut b = a.clone();
    b.instances = 5;
    let b = s.replace_app(b, a.revision, None).unwrap();
    assert_eq!((b.revision, b.instances), (2, 5));
    // A write against the old revision loses, and changes nothing.
    let mut stale = a.clone();
    stale.instances = 9;
    let e = s.replace_app(stale, a.revision, None).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Conflict {
                expected: 1,
                found: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(s.app(&a.key()).unwrap().unwrap(), b);
    assert_eq!(s.revision().unwrap(), 2);
    // Creating twice is refused; so is replacing what does not exist.
    let e = s.create_app(app("acme", "web"), None).unwrap_err();
    assert_eq!(e.to_string(), "app acme/web already exists");
    let e = s.replace_app(app("acme", "ghost"), 1, None).unwrap_err();
    assert_eq!(e.to_string(), "no app acme/ghost");
    // The same name in another tenant is another app.
    s.create_app(app("beta", "web"), None).unwrap();
    assert_eq!(s.apps(Some(&tenant("acme"))).unwrap().len(), 1);
    assert_eq!(s.apps(None).unwrap().len(), 2);
}

#[test]
fn a_failed_commit_leaves_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("s.redb")).unwrap();
    fill(&s);
    let before = s.snapshot().unwrap();

    // Several writes, the last of which cannot be done: none of them lands.
    let err = s
        .commit(vec![
            Op::PutApp {
                app: app("acme", "brand-new"),
                expect: Expect::Absent,
            },
            Op::PutPlacement {
                placement: placement("brand-new-0", "acme", "brand-new", 0),
                expect: Expect::Any,
            },
            Op::DeletePlacement {
                instance: InstanceId::new("web-0").unwrap(),
                expect: Expect::Present,
            },
            Op::PutTask {
                task: task("acme", 99),
                expect: Expect::Absent,
            },
            Op::DeleteApp {
                key: key("acme", "web"),
                expect: Expect::Any,
            },
            Op::PutApp {
                app: app("beta", "web"),
                expect: Expect::Absent,
            },
        ])
        .unwrap_err();
    assert_eq!(err.to_string(), "app beta/web already exists");
    assert_eq!(s.snapshot().unwrap(), before, "nothing was written");

    // A stale compare in the middle fails the whole list too.
    let err = s
        .commit(vec![
            Op::DeleteCrash {
                key: crash_key("acme", "web", 1),
                expect: Expect::Any,
            },
            Op::DeleteApp {
                key: key("acme", "worker"),
                expect: Expect::Revision(1),
            },
            Op::PutApp {
                app: app("acme", "other"),
                expect: Expect::Any,
            },
        ])
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(s.snapshot().unwrap(), before);

    // And the same data survives a reopen exactly as it was.
    drop(s);
    let s = RedbStore::open(&dir.path().join("s.redb")).unwrap();
    assert_eq!(s.snapshot().unwrap(), before);

    // An empty commit writes nothing and returns the current revision.
    assert_eq!(s.commit(vec![]).unwrap(), before.revision);
}

#[test]
fn deleting_an_app_removes_its_crash_records_in_the_same_commit() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("s.redb")).unwrap();
    fill(&s);
    // A crash record of another app whose name starts the same stays.
    s.create_app(app("acme", "web-2"), None).unwrap();
    s.record_crash(&crash_key("acme", "web-2", 0), Timestamp(1), "x")
        .unwrap();
    s.record_crash(&crash_key("beta", "web", 0), Timestamp(1), "x")
        .unwrap();
    let (deleted, rev) = s.delete_app(&key("acme", "web")).unwrap();
    assert_eq!(deleted.name.as_str(), "web");
    assert_eq!(rev, s.revision().unwrap());
    assert!(s.crash(&crash_key("acme", "web", 1)).unwrap().is_none());
    assert_eq!(s.crashes().unwrap().len(), 2);
    assert!(s.app(&key("acme", "web")).unwrap().is_none());
    let e = s.delete_app(&key("acme", "web")).unwrap_err();
    assert_eq!(e.to_string(), "no app acme/web");
    // Placements are actual work: they stay until convergence stops them.
    assert_eq!(s.placements().unwrap().len(), 2);
    assert_eq!(
        s.unplace(&InstanceId::new("web-0").unwrap()).unwrap(),
        rev + 1
    );
    assert_eq!(s.placements().unwrap().len(), 1);
    s.reset_crashes(&crash_key("beta", "web", 0)).unwrap();
    assert_eq!(s.crashes().unwrap().len(), 1);
}

#[test]
fn readers_see_whole_commits_while_a_writer_writes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    // Each commit writes two apps, an "a" and a "b" of the same number:
    // a reader that ever sees an odd count saw half a commit.
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            for i in 0..60 {
                s.commit(vec![
                    Op::PutApp {
                        app: app("acme", &format!("a{i}")),
                        expect: Expect::Absent,
                    },
                    Op::PutApp {
                        app: app("acme", &format!("b{i}")),
                        expect: Expect::Absent,
                    },
                ])
                .unwrap();
            }
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut last = 0;
                let mut reads = 0;
                while !done.load(Ordering::Acquire) {
                    let snap = s.snapshot().unwrap();
                    assert_eq!(snap.apps.len() % 2, 0, "half a commit seen");
                    assert_eq!(snap.apps.len() as u64, snap.revision * 2);
                    assert!(snap.revision >= last, "revision went backwards");
                    last = snap.revision;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    writer.join().unwrap();
    done.store(true, Ordering::Release);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert_eq!(s.revision().unwrap(), 60);
}

#[test]
fn concurrent_crash_counts_do_not_lose_updates() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
    let k = crash_key("acme", "web", 0);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            let k = k.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    // Read-modify-write with compare-and-swap; retried on
                    // conflict by the store, and once more here if the
                    // store's retries ran out under contention.
                    loop {
                        match s.record_crash(&k, Timestamp(1), "x") {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. } | StoreError::Exists { .. }) => {
                                continue
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.crash(&k).unwrap().unwrap().count, 20);
}

#[test]
fn a_second_open_of_the_same_file_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let _first = RedbStore::open(&path).unwrap();
    let e = RedbStore::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e:?}");
    assert!(e.to_string().contains("is another brain running"), "{e}");
}

#[test]
fn a_newer_schema_and_unreadable_records_are_reported() {
    const META: redb::TableDefinition<'_, &str, u64> = redb::TableDefinition::new("meta");
    const APPS: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("apps");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(RedbStore::open(&path).unwrap());

    let raw = |f: &dyn Fn(&redb::WriteTransaction)| {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        f(&txn);
        txn.commit().unwrap();
    };
    raw(&|txn| {
        txn.open_table(APPS)
            .unwrap()
            .insert("acme/web", b"{not json".as_slice())
            .unwrap();
    });
    let s = RedbStore::open(&path).unwrap();
    let e = s.app(&key("acme", "web")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("stored app acme/web cannot be read:"),
        "{e}"
    );
    assert!(s.snapshot().is_err());
    drop(s);

    raw(&|txn| {
        txn.open_table(META)
            .unwrap()
            .insert("schema", SCHEMA_VERSION + 1)
            .unwrap();
    });
    let e = RedbStore::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::Schema { found, .. } if found == SCHEMA_VERSION + 1));
    assert!(e.to_string().contains("upgrade the brain"), "{e}");
}

#[test]
fn a_path_that_cannot_be_a_store_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_db = dir.path().join("garbage");
    std::fs::write(&not_a_db, vec![0x42u8; 10_000]).unwrap();
    let e = RedbStore::open(&not_a_db).unwrap_err();
    assert!(e.to_string().starts_with("cannot open store"), "{e}");
    let under_a_file = not_a_db.join("brain.redb");
    let e = RedbStore::open(Path::new(&under_a_file)).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot create the store directory"),
        "{e}"
    );
}

#[test]
fn concurrent_commits_each_get_their_own_revision_and_a_failure_is_its_own() {
    // Commits that arrive together are written together (group commit):
    // each still lands whole with a revision of its own, and one that
    // cannot be done fails alone.
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
    s.create_app(app("acme", "taken"), None).unwrap();
    let start = s.revision().unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for i in 0..25 {
                    let name = if t == 0 && i == 10 {
                        "taken".to_owned()
                    } else {
                        format!("app-{t}-{i}")
                    };
                    out.push((name.clone(), s.create_app(app("acme", &name), None)));
                }
                out
            })
        })
        .collect();
    let mut revisions = Vec::new();
    for th in threads {
        for (name, result) in th.join().unwrap() {
            match result {
                Ok(created) => {
                    assert_eq!(s.app(&key("acme", &name)).unwrap().unwrap(), created);
                    revisions.push(created.revision);
                }
                Err(e) => {
                    assert_eq!(name, "taken");
                    assert!(matches!(e, StoreError::Exists { .. }), "{e}");
                }
            }
        }
    }
    assert_eq!(revisions.len(), 8 * 25 - 1);
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 8 * 25 - 1, "revisions are distinct");
    assert_eq!(s.revision().unwrap(), start + 8 * 25 - 1);
    assert_eq!(*revisions.last().unwrap(), start + 8 * 25 - 1);
}

fn with_ports(t: &str, name: &str, ports: serde_json::Value) -> App {
    let mut a = app(t, name);
    a.ports = serde_json::from_value(ports).unwrap();
    a
}

fn vips(s: &str) -> Option<corral_proto::wire::Ipv4Net> {
    Some(s.parse().unwrap())
}

#[test]
fn apps_with_ports_get_the_lowest_free_vip_released_on_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("s.redb")).unwrap();
    let range = vips("10.96.0.0/30"); // two usable addresses: .1 and .2
    let a = s.create_app(app("acme", "a"), range).unwrap();
    let b = s.create_app(app("beta", "b"), range).unwrap();
    assert_eq!(a.vip, Some("10.96.0.1".parse().unwrap()));
    assert_eq!(b.vip, Some("10.96.0.2".parse().unwrap()));
    assert_eq!(
        s.app(&key("acme", "a")).unwrap().unwrap().vip,
        a.vip,
        "stored"
    );

    // No ports, no VIP; without a range, no VIP either.
    let quiet = s.create_app(with_ports("acme", "quiet", serde_json::json!([])), range);
    assert_eq!(quiet.unwrap().vip, None);
    let dir2 = tempfile::tempdir().unwrap();
    let plain = RedbStore::open(&dir2.path().join("s.redb")).unwrap();
    assert_eq!(plain.create_app(app("acme", "a"), None).unwrap().vip, None);

    // The range is full: refused, naming the range, and nothing is written.
    let before = s.snapshot().unwrap();
    let e = s.create_app(app("acme", "c"), range).unwrap_err();
    assert!(matches!(e, StoreError::VipsExhausted { .. }), "{e}");
    assert!(e.to_string().contains("vip_range 10.96.0.0/30"), "{e}");
    assert_eq!(s.snapshot().unwrap(), before);
    assert_eq!(s.claims().unwrap().len(), 2);
    // A patch that gives ports to an app without a VIP: refused the same way.
    let quiet = s.app(&key("acme", "quiet")).unwrap().unwrap();
    let mut patched = quiet.clone();
    patched.ports = vec![corral_proto::service::PortSpec::tcp(80)];
    let e = s
        .replace_app(patched.clone(), quiet.revision, range)
        .unwrap_err();
    assert!(matches!(e, StoreError::VipsExhausted { .. }), "{e}");
    assert_eq!(s.snapshot().unwrap(), before);

    // A deleted app's VIP is free again, and the lowest free is taken.
    s.delete_app(&key("acme", "a")).unwrap();
    assert_eq!(s.claims().unwrap().len(), 1);
    let patched = s.replace_app(patched, quiet.revision, range).unwrap();
    assert_eq!(patched.vip, Some("10.96.0.1".parse().unwrap()));
    // Kept for the app's life: a patch that removes its ports keeps it.
    let mut no_ports = patched.clone();
    no_ports.ports.clear();
    let kept = s.replace_app(no_ports, patched.revision, range).unwrap();
    assert_eq!(kept.vip, patched.vip);
    let e = s.create_app(app("acme", "c"), range).unwrap_err();
    assert!(matches!(e, StoreError::VipsExhausted { .. }), "{e}");
}

#[test]
fn apps_created_without_a_range_get_a_vip_once_there_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("s.redb")).unwrap();
    let web = s.create_app(app("acme", "web"), None).unwrap();
    let quiet = s
        .create_app(with_ports("acme", "quiet", serde_json::json!([])), None)
        .unwrap();
    assert_eq!(web.vip, None);
    let range = vips("10.96.0.0/30").unwrap();
    let taken = s.create_app(app("beta", "b"), Some(range)).unwrap();
    assert_eq!(taken.vip, Some("10.96.0.1".parse().unwrap()));

    let given = give_missing_vips(&s, &s.apps(None).unwrap(), range).unwrap();
    assert_eq!(given.len(), 1, "{given:?}");
    let now = s.app(&key("acme", "web")).unwrap().unwrap();
    assert_eq!(
        now.vip,
        Some("10.96.0.2".parse().unwrap()),
        "the lowest free"
    );
    assert_eq!(now.version, web.version, "no instance is replaced");
    assert!(now.revision > web.revision);
    assert_eq!(s.claims().unwrap().len(), 2);
    assert_eq!(s.app(&key("acme", "quiet")).unwrap().unwrap(), quiet);
    // Nothing left to give: nothing changes.
    let before = s.snapshot().unwrap();
    assert!(give_missing_vips(&s, &s.apps(None).unwrap(), range)
        .unwrap()
        .is_empty());
    assert_eq!(s.snapshot().unwrap(), before);

    // A full range: refused with what was given kept, naming the range.
    let late = s.create_app(app("acme", "late"), None).unwrap();
    let e = give_missing_vips(&s, &s.apps(None).unwrap(), range).unwrap_err();
    assert!(matches!(e, StoreError::VipsExhausted { .. }), "{e}");
    assert_eq!(s.app(&key("acme", "late")).unwrap().unwrap(), late);
}

#[test]
fn a_published_port_is_held_by_one_app_per_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("s.redb")).unwrap();
    let web = serde_json::json!([{"port": 80, "published": 30080}]);
    let a = s
        .create_app(with_ports("acme", "web", web.clone()), None)
        .unwrap();
    let e = s
        .create_app(with_ports("beta", "web", web.clone()), None)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "published port 30080/tcp is held by app acme/web: choose another"
    );
    assert!(s.app(&key("beta", "web")).unwrap().is_none());
    // The same number over UDP is another port.
    let udp = serde_json::json!([{"port": 53, "protocol": "udp", "published": 30080}]);
    s.create_app(with_ports("beta", "dns", udp), None).unwrap();
    // A patch that stops publishing releases it; deleting releases the rest.
    let mut moved = a.clone();
    moved.ports =
        serde_json::from_value(serde_json::json!([{"port": 80, "published": 30081}])).unwrap();
    let moved = s.replace_app(moved, a.revision, None).unwrap();
    let b = s.create_app(with_ports("beta", "web", web), None).unwrap();
    assert_eq!(b.ports[0].published, Some(30080));
    let mut steal = moved.clone();
    steal.ports = b.ports.clone();
    let e = s.replace_app(steal, moved.revision, None).unwrap_err();
    assert!(matches!(e, StoreError::Claimed { .. }), "{e}");
    s.delete_app(&key("acme", "web")).unwrap();
    s.delete_app(&key("beta", "web")).unwrap();
    let left: Vec<String> = s.claims().unwrap().iter().map(|c| c.claim.key()).collect();
    assert_eq!(left, vec!["published/udp/30080"]);
}

#[test]
fn concurrent_creates_never_share_a_vip() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
    let range = vips("10.96.0.0/24");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| s.create_app(app("acme", &format!("app-{t}-{i}")), range))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut got = std::collections::BTreeSet::new();
    for th in threads {
        for r in th.join().unwrap() {
            assert!(got.insert(r.unwrap().vip.unwrap()), "a VIP given twice");
        }
    }
    assert_eq!(got.len(), 80);
    assert_eq!(
        got.last().unwrap().to_string(),
        "10.96.0.80",
        "the lowest ones"
    );
}
