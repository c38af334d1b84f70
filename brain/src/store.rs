//! The brain's durable state behind one trait, [`Store`], and its embedded
//! implementation on a single redb file, [`RedbStore`].
//!
//! Every write is one call to [`Store::commit`] with a list of [`Op`]s that
//! is applied atomically: each op may carry an [`Expect`]ation (absent,
//! present, at revision n) and if any fails, or anything else goes wrong,
//! nothing of the list is written. Each commit advances the store's
//! revision by one and stamps it on every record it writes, so revisions
//! work like etcd's `mod_revision` and compare-and-swap is a commit with
//! `Expect::Revision`. That is also the shape an etcd implementation needs
//! (one `Txn` with compares), which is why the trait is built around it.

use crate::claims::{claims_of, lowest_free_vip, Claim, ClaimRecord};
use crate::desired::{App, AppKey, CrashKey, CrashRecord, Placement, StoredPolicy, Task, TaskId};
use corral_proto::policy::PolicyRule;
use corral_proto::wire::Ipv4Net;
use corral_proto::{InstanceId, TenantId, Timestamp};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The store file format this code writes; a newer file is refused.
pub const SCHEMA_VERSION: u64 = 1;

/// What a write requires of the record it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: create, overwrite, or (for deletes) do nothing if absent.
    Any,
    /// The record must not exist.
    Absent,
    /// The record must exist.
    Present,
    /// The record must exist and have been last written at this revision.
    Revision(u64),
}

/// One write, part of an atomic [`Store::commit`].
#[derive(Debug, Clone)]
pub enum Op {
    PutApp {
        app: App,
        expect: Expect,
    },
    /// Also removes the app's crash records.
    DeleteApp {
        key: AppKey,
        expect: Expect,
    },
    PutTask {
        task: Task,
        expect: Expect,
    },
    PutPlacement {
        placement: Placement,
        expect: Expect,
    },
    DeletePlacement {
        instance: InstanceId,
        expect: Expect,
    },
    PutCrash {
        record: CrashRecord,
        expect: Expect,
    },
    DeleteCrash {
        key: CrashKey,
        expect: Expect,
    },
    PutPolicy {
        policy: StoredPolicy,
        expect: Expect,
    },
    DeletePolicy {
        rule: PolicyRule,
        expect: Expect,
    },
    /// A VIP or published port held by one app (see [`crate::claims`]).
    PutClaim {
        record: ClaimRecord,
        expect: Expect,
    },
    DeleteClaim {
        claim: Claim,
        expect: Expect,
    },
}

/// Everything in the store as of one revision (one read transaction).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: u64,
    pub apps: Vec<App>,
    pub tasks: Vec<Task>,
    pub placements: Vec<Placement>,
    pub crashes: Vec<CrashRecord>,
    pub policies: Vec<StoredPolicy>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the store directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "store {path} is open in another process: is another brain running with the same data_dir?"
    )]
    Locked { path: PathBuf },
    #[error("cannot open store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error(
        "store {path} has schema version {found}, newer than this brain's {SCHEMA_VERSION}: upgrade the brain"
    )]
    Schema { path: PathBuf, found: u64 },
    #[error("store failed while {op}: {source}")]
    Backend {
        op: &'static str,
        #[source]
        source: redb::Error,
    },
    #[error("{kind} {key} already exists")]
    Exists { kind: &'static str, key: String },
    #[error("no {kind} {key}")]
    NotFound { kind: &'static str, key: String },
    #[error("{kind} {key} was changed concurrently (expected revision {expected}, found {found}): read it again and retry")]
    Conflict {
        kind: &'static str,
        key: String,
        expected: u64,
        found: u64,
    },
    #[error("stored {kind} {key} cannot be read: {source}")]
    Corrupt {
        kind: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{claim} is held by app {holder}: choose another")]
    Claimed { claim: Claim, holder: AppKey },
    #[error("no free address left in vip_range {range}: widen [network] vip_range or delete an app that has one")]
    VipsExhausted { range: Ipv4Net },
    #[error("cannot encode {kind} {key}: {source}")]
    Encode {
        kind: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// How often the provided read-modify-write helpers retry a conflict.
const RETRIES: usize = 5;
/// How often a write that takes claims chooses again after losing one to
/// a concurrent write: each loss means another write won, so this bounds
/// the concurrent writers it can lose to, not the time.
const CLAIM_RETRIES: usize = 64;

/// Durable desired state. Writes go through [`Store::commit`]; the provided
/// methods are conveniences over it and the reads.
pub trait Store: Send + Sync {
    /// Applies `ops` atomically and returns the new revision; on any error
    /// nothing is written and the revision stays. An empty list writes
    /// nothing and returns the current revision.
    fn commit(&self, ops: Vec<Op>) -> Result<u64, StoreError>;
    /// The revision of the last commit (0 for a new store).
    fn revision(&self) -> Result<u64, StoreError>;
    fn app(&self, key: &AppKey) -> Result<Option<App>, StoreError>;
    /// All apps, or one tenant's, ordered by tenant and name.
    fn apps(&self, tenant: Option<&TenantId>) -> Result<Vec<App>, StoreError>;
    fn task(&self, id: &TaskId) -> Result<Option<Task>, StoreError>;
    /// All tasks, or one tenant's, ordered by id.
    fn tasks(&self, tenant: Option<&TenantId>) -> Result<Vec<Task>, StoreError>;
    fn placement(&self, instance: &InstanceId) -> Result<Option<Placement>, StoreError>;
    fn placements(&self) -> Result<Vec<Placement>, StoreError>;
    fn crash(&self, key: &CrashKey) -> Result<Option<CrashRecord>, StoreError>;
    fn crashes(&self) -> Result<Vec<CrashRecord>, StoreError>;
    /// Every cross-tenant policy, ordered by key.
    fn policies(&self) -> Result<Vec<StoredPolicy>, StoreError>;
    /// Every VIP and published port held, with the app that holds it.
    fn claims(&self) -> Result<Vec<ClaimRecord>, StoreError>;
    /// Everything, consistently as of one revision.
    fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// Creates an app that must not exist yet; returns it as stored. In
    /// the same commit it takes what it holds cluster-wide: its published
    /// ports and, if it has ports and `vips` is given, the lowest free VIP
    /// of that range. A published port another app holds is refused
    /// ([`StoreError::Claimed`]), a full range too
    /// ([`StoreError::VipsExhausted`]); either way nothing is written.
    fn create_app(&self, app: App, vips: Option<Ipv4Net>) -> Result<App, StoreError> {
        claiming(|| {
            let mut app = app.clone();
            let mut ops = claim_ops(self, None, &mut app, vips)?;
            ops.insert(
                0,
                Op::PutApp {
                    app: app.clone(),
                    expect: Expect::Absent,
                },
            );
            app.revision = self.commit(ops)?;
            Ok(app)
        })
    }

    /// Creates apps that must not exist yet, all in one commit (one disk
    /// sync), or none: as [`create_app`](Self::create_app) for each, in
    /// order, each seeing the claims of those before it. Returns them as
    /// stored, in the order given. The caller refuses a batch naming the
    /// same app twice; here the second would fail the commit (`Exists`).
    fn create_apps(&self, apps: Vec<App>, vips: Option<Ipv4Net>) -> Result<Vec<App>, StoreError> {
        claiming(|| {
            let mut held = held_claims(self)?;
            let mut out = Vec::with_capacity(apps.len());
            let mut ops = Vec::new();
            for app in &apps {
                let mut app = app.clone();
                let claims = claim_ops_against(&mut held, None, &mut app, vips)?;
                ops.push(Op::PutApp {
                    app: app.clone(),
                    expect: Expect::Absent,
                });
                ops.extend(claims);
                out.push(app);
            }
            let revision = self.commit(ops)?;
            for app in &mut out {
                app.revision = revision;
            }
            Ok(out)
        })
    }

    /// Replaces an app last written at `expected`; returns it as stored.
    /// Claims follow the new ports as in [`create_app`](Self::create_app):
    /// an app that gains ports gets a VIP, one that stops publishing a
    /// port releases it. The VIP is kept while the app lives.
    fn replace_app(
        &self,
        app: App,
        expected: u64,
        vips: Option<Ipv4Net>,
    ) -> Result<App, StoreError> {
        claiming(|| {
            let key = app.key();
            let old = self.app(&key)?.ok_or_else(|| StoreError::NotFound {
                kind: "app",
                key: key.to_string(),
            })?;
            if old.revision != expected {
                return Err(StoreError::Conflict {
                    kind: "app",
                    key: key.to_string(),
                    expected,
                    found: old.revision,
                });
            }
            let mut app = app.clone();
            // The VIP belongs to the app, not to the patch.
            app.vip = old.vip;
            let mut ops = claim_ops(self, Some(&old), &mut app, vips)?;
            ops.insert(
                0,
                Op::PutApp {
                    app: app.clone(),
                    expect: Expect::Revision(expected),
                },
            );
            app.revision = self.commit(ops)?;
            Ok(app)
        })
    }

    /// Deletes an app (and its crash records and claims); returns what
    /// was deleted and the revision of the deletion.
    fn delete_app(&self, key: &AppKey) -> Result<(App, u64), StoreError> {
        retry(|| {
            let app = self.app(key)?.ok_or_else(|| StoreError::NotFound {
                kind: "app",
                key: key.to_string(),
            })?;
            let mut ops = vec![Op::DeleteApp {
                key: key.clone(),
                expect: Expect::Revision(app.revision),
            }];
            ops.extend(claims_of(&app).into_iter().map(|claim| Op::DeleteClaim {
                claim,
                expect: Expect::Any,
            }));
            let rev = self.commit(ops)?;
            Ok((app, rev))
        })
    }

    /// Creates a task that must not exist yet; returns it as stored.
    fn create_task(&self, mut task: Task) -> Result<Task, StoreError> {
        let rev = self.commit(vec![Op::PutTask {
            task: task.clone(),
            expect: Expect::Absent,
        }])?;
        task.revision = rev;
        Ok(task)
    }

    /// Replaces a task last written at `expected`; returns it as stored.
    fn replace_task(&self, mut task: Task, expected: u64) -> Result<Task, StoreError> {
        let rev = self.commit(vec![Op::PutTask {
            task: task.clone(),
            expect: Expect::Revision(expected),
        }])?;
        task.revision = rev;
        Ok(task)
    }

    /// Records (or moves) a placement; returns it as stored.
    fn place(&self, mut placement: Placement) -> Result<Placement, StoreError> {
        let rev = self.commit(vec![Op::PutPlacement {
            placement: placement.clone(),
            expect: Expect::Any,
        }])?;
        placement.revision = rev;
        Ok(placement)
    }

    /// Forgets a placement (nothing happens if there is none).
    fn unplace(&self, instance: &InstanceId) -> Result<u64, StoreError> {
        self.commit(vec![Op::DeletePlacement {
            instance: instance.clone(),
            expect: Expect::Any,
        }])
    }

    /// Counts one more crash of `key`; returns the updated record.
    fn record_crash(
        &self,
        key: &CrashKey,
        at: Timestamp,
        reason: &str,
    ) -> Result<CrashRecord, StoreError> {
        retry(|| {
            let previous = self.crash(key)?;
            let expect = previous
                .as_ref()
                .map_or(Expect::Absent, |p| Expect::Revision(p.revision));
            let mut record = CrashRecord::bump(previous, key.clone(), at, reason);
            record.revision = self.commit(vec![Op::PutCrash {
                record: record.clone(),
                expect,
            }])?;
            Ok(record)
        })
    }

    /// Forgets the crashes of `key` (after it ran long enough).
    fn reset_crashes(&self, key: &CrashKey) -> Result<u64, StoreError> {
        self.commit(vec![Op::DeleteCrash {
            key: key.clone(),
            expect: Expect::Any,
        }])
    }
}

/// Gives every app with ports but no VIP one from `range`: apps created
/// before `[network] vip_range` was set (or while it was not). Each app is
/// its own commit, as a patch that changes nothing else would be (its
/// version stays, so no instance is replaced). Returns the apps given a
/// VIP; stops at the first error (a full range), keeping what was given.
/// A VIP outside a changed `range` is kept: clients may hold it. `apps`
/// are the stored apps as last read (the brain's start-up snapshot); one
/// changed since is refused as changed concurrently.
pub fn give_missing_vips(
    store: &dyn Store,
    apps: &[App],
    range: Ipv4Net,
) -> Result<Vec<App>, StoreError> {
    let mut given = Vec::new();
    for app in apps {
        if app.vip.is_some() || app.ports.is_empty() {
            continue;
        }
        given.push(store.replace_app(app.clone(), app.revision, Some(range))?);
    }
    Ok(given)
}

/// The claim writes that take `app` from holding what `old` held to what
/// it needs now, giving it a VIP first if it has ports and none yet.
/// Checked against the claims as read: a claim another app holds is
/// refused here; one taken between this read and the commit fails the
/// commit (`Exists`), and [`claiming`] reads again.
fn claim_ops<S: Store + ?Sized>(
    store: &S,
    old: Option<&App>,
    app: &mut App,
    vips: Option<Ipv4Net>,
) -> Result<Vec<Op>, StoreError> {
    let mut held = held_claims(store)?;
    claim_ops_against(&mut held, old, app, vips)
}

/// Every claim held, with its holder.
fn held_claims<S: Store + ?Sized>(store: &S) -> Result<BTreeMap<Claim, AppKey>, StoreError> {
    Ok(store
        .claims()?
        .into_iter()
        .map(|r| (r.claim, r.app))
        .collect())
}

/// [`claim_ops`] against claims already read, which it updates with what
/// `app` takes (so that the next app of a batch sees them held).
fn claim_ops_against(
    held: &mut BTreeMap<Claim, AppKey>,
    old: Option<&App>,
    app: &mut App,
    vips: Option<Ipv4Net>,
) -> Result<Vec<Op>, StoreError> {
    let key = app.key();
    if let (None, false, Some(range)) = (app.vip, app.ports.is_empty(), vips) {
        let used: BTreeSet<_> = held
            .keys()
            .filter_map(|c| match c {
                Claim::Vip { vip } => Some(*vip),
                Claim::Published { .. } => None,
            })
            .collect();
        app.vip = Some(lowest_free_vip(range, &used).ok_or(StoreError::VipsExhausted { range })?);
    }
    let want = claims_of(app);
    let had = old.map(claims_of).unwrap_or_default();
    let mut ops = Vec::new();
    for claim in &want {
        match held.get(claim) {
            Some(holder) if *holder == key => {}
            Some(holder) => {
                return Err(StoreError::Claimed {
                    claim: *claim,
                    holder: holder.clone(),
                })
            }
            None => ops.push(Op::PutClaim {
                record: ClaimRecord {
                    claim: *claim,
                    app: key.clone(),
                    revision: 0,
                },
                expect: Expect::Absent,
            }),
        }
    }
    for claim in &want {
        held.insert(*claim, key.clone());
    }
    for claim in had.difference(&want) {
        if held.get(claim) == Some(&key) {
            ops.push(Op::DeleteClaim {
                claim: *claim,
                expect: Expect::Any,
            });
        }
    }
    Ok(ops)
}

/// Runs a write that takes claims until it does not lose a race for one:
/// a claim created since it was read (`Exists` on a claim) means "read
/// again and choose again". Any other error, an app that exists included,
/// is final.
fn claiming<T>(mut f: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let mut tries = 0;
    loop {
        match f() {
            Err(StoreError::Exists { kind, .. })
                if kind == ClaimRecord::KIND && tries < CLAIM_RETRIES =>
            {
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Runs a read-modify-write until it does not lose a race: a `Conflict`
/// (the record changed since it was read) or an `Exists` (it was created
/// since it was read as absent) means "read again".
fn retry<T>(mut f: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let mut last = None;
    for _ in 0..RETRIES {
        match f() {
            Err(e @ (StoreError::Conflict { .. } | StoreError::Exists { .. })) => last = Some(e),
            other => return other,
        }
    }
    match last {
        Some(e) => Err(e),
        None => f(),
    }
}

type Bytes = &'static [u8];
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const APPS: TableDefinition<'_, &str, Bytes> = TableDefinition::new("apps");
const TASKS: TableDefinition<'_, &str, Bytes> = TableDefinition::new("tasks");
const PLACEMENTS: TableDefinition<'_, &str, Bytes> = TableDefinition::new("placements");
const CRASHES: TableDefinition<'_, &str, Bytes> = TableDefinition::new("crashes");
const POLICIES: TableDefinition<'_, &str, Bytes> = TableDefinition::new("policies");
const CLAIMS: TableDefinition<'_, &str, Bytes> = TableDefinition::new("claims");
const REVISION: &str = "revision";
const SCHEMA: &str = "schema";

/// A record kept as JSON in one table.
trait Record: Serialize + DeserializeOwned {
    const KIND: &'static str;
    const TABLE: TableDefinition<'static, &'static str, Bytes>;
    fn key(&self) -> String;
    fn revision(&self) -> u64;
    fn set_revision(&mut self, rev: u64);
}

impl Record for App {
    const KIND: &'static str = "app";
    const TABLE: TableDefinition<'static, &'static str, Bytes> = APPS;
    fn key(&self) -> String {
        app_key(&self.key())
    }
    fn revision(&self) -> u64 {
        self.revision
    }
    fn set_revision(&mut self, rev: u64) {
        self.revision = rev;
    }
}

impl Record for Task {
    const KIND: &'static str = "task";
    const TABLE: TableDefinition<'static, &'static str, Bytes> = TASKS;
    fn key(&self) -> String {
        self.id.as_str().to_owned()
    }
    fn revision(&self) -> u64 {
        self.revision
    }
    fn set_revision(&mut self, rev: u64) {
        self.revision = rev;
    }
}

impl Record for Placement {
    const KIND: &'static str = "placement";
    const TABLE: TableDefinition<'static, &'static str, Bytes> = PLACEMENTS;
    fn key(&self) -> String {
        self.instance.as_str().to_owned()
    }
    fn revision(&self) -> u64 {
        self.revision
    }
    fn set_revision(&mut self, rev: u64) {
        self.revision = rev;
    }
}

impl Record for CrashRecord {
    const KIND: &'static str = "crash record";
    const TABLE: TableDefinition<'static, &'static str, Bytes> = CRASHES;
    fn key(&self) -> String {
        crash_key(&self.key)
    }
    fn revision(&self) -> u64 {
        self.revision
    }
    fn set_revision(&mut self, rev: u64) {
        self.revision = rev;
    }
}

impl Record for StoredPolicy {
    const KIND: &'static str = "policy";
    const TABLE: TableDefinition<'static, &'static str, Bytes> = POLICIES;
    fn key(&self) -> String {
        policy_key(&self.rule)
    }
    fn revision(&self) -> u64 {
        self.revision
    }
    fn set_revision(&mut self, rev: u64) {
        self.revision = rev;
    }
}

impl Record for ClaimRecord {
    const KIND: &'static str = "claim";
    const TABLE: TableDefinition<'static, &'static str, Bytes> = CLAIMS;
    fn key(&self) -> String {
        self.claim.key()
    }
    fn revision(&self) -> u64 {
        self.revision
    }
    fn set_revision(&mut self, rev: u64) {
        self.revision = rev;
    }
}

fn policy_key(r: &PolicyRule) -> String {
    // "*" cannot be an app id, so "every app" never collides with one.
    let app = r.app.as_ref().map_or("*", |a| a.as_str());
    format!("{}/{}/{}/{}/{}", r.from, r.to, app, r.protocol, r.port)
}

// Ids cannot contain '/', so "tenant/name" is unambiguous and a tenant's
// records are the key range "tenant/" .. "tenant0" ('0' follows '/').
fn app_key(k: &AppKey) -> String {
    format!("{}/{}", k.tenant, k.name)
}

fn crash_key(k: &CrashKey) -> String {
    format!("{}/{}/{}", k.tenant, k.app, k.index)
}

fn prefix_range(prefix: &str) -> (String, String) {
    (format!("{prefix}/"), format!("{prefix}0"))
}

/// Opens (creating if needed) the redb file at `path`.
fn open_db(path: &Path) -> Result<redb::Database, StoreError> {
    redb::Builder::new()
        .set_cache_size(64 << 20)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.to_owned(),
            },
            source => StoreError::Open {
                path: path.to_owned(),
                source,
            },
        })
}

fn backend<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Backend {
        op,
        source: e.into(),
    }
}

fn decode<R: Record>(key: &str, bytes: &[u8]) -> Result<R, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        kind: R::KIND,
        key: key.to_owned(),
        source,
    })
}

fn check(
    kind: &'static str,
    key: &str,
    current: Option<u64>,
    expect: Expect,
) -> Result<(), StoreError> {
    let err_key = || key.to_owned();
    match (expect, current) {
        (Expect::Any, _) | (Expect::Absent, None) | (Expect::Present, Some(_)) => Ok(()),
        (Expect::Revision(want), Some(found)) if want == found => Ok(()),
        (Expect::Absent, Some(_)) => Err(StoreError::Exists {
            kind,
            key: err_key(),
        }),
        (Expect::Present | Expect::Revision(_), None) => Err(StoreError::NotFound {
            kind,
            key: err_key(),
        }),
        (Expect::Revision(expected), Some(found)) => Err(StoreError::Conflict {
            kind,
            key: err_key(),
            expected,
            found,
        }),
    }
}

/// The open write transaction's tables, one per record kind.
struct Tables<'t> {
    apps: redb::Table<'t, &'static str, Bytes>,
    tasks: redb::Table<'t, &'static str, Bytes>,
    placements: redb::Table<'t, &'static str, Bytes>,
    crashes: redb::Table<'t, &'static str, Bytes>,
    policies: redb::Table<'t, &'static str, Bytes>,
    claims: redb::Table<'t, &'static str, Bytes>,
}

fn current<R: Record>(
    table: &redb::Table<'_, &'static str, Bytes>,
    key: &str,
) -> Result<Option<u64>, StoreError> {
    match table.get(key).map_err(backend("reading"))? {
        None => Ok(None),
        Some(v) => decode::<R>(key, v.value()).map(|r| Some(r.revision())),
    }
}

fn put<R: Record>(
    table: &mut redb::Table<'_, &'static str, Bytes>,
    mut rec: R,
    expect: Expect,
    rev: u64,
) -> Result<(), StoreError> {
    let key = rec.key();
    check(R::KIND, &key, current::<R>(table, &key)?, expect)?;
    rec.set_revision(rev);
    let bytes = serde_json::to_vec(&rec).map_err(|source| StoreError::Encode {
        kind: R::KIND,
        key: key.clone(),
        source,
    })?;
    table
        .insert(key.as_str(), bytes.as_slice())
        .map_err(backend("writing"))?;
    Ok(())
}

fn delete<R: Record>(
    table: &mut redb::Table<'_, &'static str, Bytes>,
    key: &str,
    expect: Expect,
) -> Result<(), StoreError> {
    check(R::KIND, key, current::<R>(table, key)?, expect)?;
    table.remove(key).map_err(backend("deleting"))?;
    Ok(())
}

impl Tables<'_> {
    fn apply(&mut self, op: Op, rev: u64) -> Result<(), StoreError> {
        match op {
            Op::PutApp { app, expect } => put(&mut self.apps, app, expect, rev),
            Op::DeleteApp { key, expect } => {
                delete::<App>(&mut self.apps, &app_key(&key), expect)?;
                let (lo, hi) = prefix_range(&app_key(&key));
                self.crashes
                    .retain_in::<&str, _>(lo.as_str()..hi.as_str(), |_, _| false)
                    .map_err(backend("deleting crash records"))
            }
            Op::PutTask { task, expect } => put(&mut self.tasks, task, expect, rev),
            Op::PutPlacement { placement, expect } => {
                put(&mut self.placements, placement, expect, rev)
            }
            Op::DeletePlacement { instance, expect } => {
                delete::<Placement>(&mut self.placements, instance.as_str(), expect)
            }
            Op::PutCrash { record, expect } => put(&mut self.crashes, record, expect, rev),
            Op::DeleteCrash { key, expect } => {
                delete::<CrashRecord>(&mut self.crashes, &crash_key(&key), expect)
            }
            Op::PutPolicy { policy, expect } => put(&mut self.policies, policy, expect, rev),
            Op::DeletePolicy { rule, expect } => {
                delete::<StoredPolicy>(&mut self.policies, &policy_key(&rule), expect)
            }
            Op::PutClaim { record, expect } => put(&mut self.claims, record, expect, rev),
            Op::DeleteClaim { claim, expect } => {
                delete::<ClaimRecord>(&mut self.claims, &claim.key(), expect)
            }
        }
    }
}

/// The embedded store: one redb file, one writer at a time, readers never
/// blocked (MVCC). The file is locked: a second process (another brain on
/// the same `data_dir`) cannot open it.
pub struct RedbStore {
    /// None only while it is being reopened, or when reopening failed.
    db: std::sync::RwLock<Option<redb::Database>>,
    /// An I/O error failed an operation: reopen before the next one. redb
    /// latches I/O errors (every later operation fails with "previous I/O
    /// error" until the database is closed and opened again), so a disk
    /// that filled once would refuse every write until a restart.
    failed: std::sync::atomic::AtomicBool,
    path: PathBuf,
    group: Group,
}

/// Group commit: commits that arrive while another is being written wait,
/// and the next writer writes all of them in one transaction (one disk
/// sync), each with its own revision, in arrival order. Concurrent API
/// requests then share syncs instead of queueing for one each.
#[derive(Default)]
struct Group {
    state: std::sync::Mutex<GroupState>,
    done: std::sync::Condvar,
}

#[derive(Default)]
struct GroupState {
    next: u64,
    queue: Vec<(u64, Vec<Op>)>,
    results: std::collections::BTreeMap<u64, Result<u64, StoreError>>,
    /// A thread is writing a group.
    writing: bool,
}

/// Clears `writing` however the writer leaves (a panic included), so that
/// waiters do not wait forever.
struct Writing<'a>(&'a Group);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        st.writing = false;
        self.0.done.notify_all();
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbStore {
    /// Opens the store at `path`, creating it (and its directory) if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let store = Self {
            db: std::sync::RwLock::new(Some(open_db(path)?)),
            failed: std::sync::atomic::AtomicBool::new(false),
            path: path.to_owned(),
            group: Group::default(),
        };
        store.init()?;
        Ok(store)
    }

    /// Runs `f` on the database, reopening it first if an I/O error failed
    /// an earlier operation; notes an I/O error `f` meets.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        use std::sync::atomic::Ordering;
        if self.failed.load(Ordering::Acquire) {
            let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
            if self.failed.swap(false, Ordering::AcqRel) {
                // The old handle holds the file's lock: closed first.
                *db = None;
                match open_db(&self.path) {
                    Ok(fresh) => {
                        tracing::warn!(path = %self.path.display(), "store reopened after an I/O error");
                        *db = Some(fresh);
                    }
                    Err(e) => {
                        self.failed.store(true, Ordering::Release);
                        return Err(e);
                    }
                }
            }
        }
        let db = self.db.read().unwrap_or_else(|e| e.into_inner());
        let Some(db) = db.as_ref() else {
            // Reopening failed: the next operation tries again.
            self.failed.store(true, Ordering::Release);
            return Err(StoreError::Backend {
                op: "reopening",
                source: redb::Error::PreviousIo,
            });
        };
        let result = f(db);
        if let Err(StoreError::Backend { source, .. }) = &result {
            if matches!(source, redb::Error::Io(_) | redb::Error::PreviousIo) {
                self.failed.store(true, Ordering::Release);
            }
        }
        result
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the tables of a new file and checks the schema of an old one.
    fn init(&self) -> Result<(), StoreError> {
        self.with_db(|db| self.init_in(db))
    }

    fn init_in(&self, db: &redb::Database) -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(backend("opening"))?;
        {
            let mut meta = txn.open_table(META).map_err(backend("opening"))?;
            let schema = meta
                .get(SCHEMA)
                .map_err(backend("opening"))?
                .map(|v| v.value());
            match schema {
                Some(found) if found > SCHEMA_VERSION => {
                    return Err(StoreError::Schema {
                        path: self.path.clone(),
                        found,
                    })
                }
                Some(_) => {}
                None => {
                    meta.insert(SCHEMA, SCHEMA_VERSION)
                        .map_err(backend("opening"))?;
                    meta.insert(REVISION, 0).map_err(backend("opening"))?;
                }
            }
            // Opening in a write transaction creates a table missing from a
            // file written by an older brain (policies and claims came later).
            for t in [APPS, TASKS, PLACEMENTS, CRASHES, POLICIES, CLAIMS] {
                txn.open_table(t).map_err(backend("opening"))?;
            }
        }
        txn.commit().map_err(backend("opening"))
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(backend("reading"))?;
            f(&txn)
        })
    }
}

fn read_revision(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    let meta = txn.open_table(META).map_err(backend("reading"))?;
    let rev = meta.get(REVISION).map_err(backend("reading"))?;
    Ok(rev.map_or(0, |v| v.value()))
}

fn get<R: Record>(txn: &redb::ReadTransaction, key: &str) -> Result<Option<R>, StoreError> {
    let table = txn.open_table(R::TABLE).map_err(backend("reading"))?;
    let got = table.get(key).map_err(backend("reading"))?;
    got.map(|v| decode(key, v.value())).transpose()
}

/// Records of one table, all or those whose key starts with `prefix/`.
fn scan<R: Record>(
    txn: &redb::ReadTransaction,
    prefix: Option<&str>,
) -> Result<Vec<R>, StoreError> {
    let table = txn.open_table(R::TABLE).map_err(backend("reading"))?;
    let iter = match prefix {
        None => table.iter(),
        Some(p) => {
            let (lo, hi) = prefix_range(p);
            table.range::<&str>(lo.as_str()..hi.as_str())
        }
    }
    .map_err(backend("reading"))?;
    let mut out = Vec::new();
    for entry in iter {
        let (k, v) = entry.map_err(backend("reading"))?;
        out.push(decode(k.value(), v.value())?);
    }
    Ok(out)
}

impl RedbStore {
    /// Writes a group of commits in one transaction, each with its own
    /// revision. If any of them fails, the transaction is dropped and each
    /// is committed on its own, so that one commit's error is its alone.
    fn write_group(&self, group: Vec<(u64, Vec<Op>)>) -> Vec<(u64, Result<u64, StoreError>)> {
        if group.len() > 1 {
            if let Ok(revs) = self.commit_many(group.iter().map(|(_, ops)| ops.clone()).collect()) {
                return group
                    .iter()
                    .map(|(t, _)| *t)
                    .zip(revs.into_iter().map(Ok))
                    .collect();
            }
        }
        group
            .into_iter()
            .map(|(t, ops)| (t, self.commit_one(ops)))
            .collect()
    }

    /// Several commits in one transaction; all or none.
    fn commit_many(&self, commits: Vec<Vec<Op>>) -> Result<Vec<u64>, StoreError> {
        self.with_db(|db| Self::commit_many_in(db, commits))
    }

    fn commit_many_in(db: &redb::Database, commits: Vec<Vec<Op>>) -> Result<Vec<u64>, StoreError> {
        let txn = db.begin_write().map_err(backend("starting a write"))?;
        let written = (|| {
            let mut meta = txn.open_table(META).map_err(backend("writing"))?;
            let mut rev = meta
                .get(REVISION)
                .map_err(backend("writing"))?
                .map_or(0, |v| v.value());
            let mut tables = Tables {
                apps: txn.open_table(APPS).map_err(backend("writing"))?,
                tasks: txn.open_table(TASKS).map_err(backend("writing"))?,
                placements: txn.open_table(PLACEMENTS).map_err(backend("writing"))?,
                crashes: txn.open_table(CRASHES).map_err(backend("writing"))?,
                policies: txn.open_table(POLICIES).map_err(backend("writing"))?,
                claims: txn.open_table(CLAIMS).map_err(backend("writing"))?,
            };
            let mut revs = Vec::with_capacity(commits.len());
            for ops in commits {
                rev += 1;
                for op in ops {
                    tables.apply(op, rev)?;
                }
                revs.push(rev);
            }
            meta.insert(REVISION, rev).map_err(backend("writing"))?;
            Ok(revs)
        })();
        match written {
            Ok(revs) => {
                txn.commit().map_err(backend("committing"))?;
                Ok(revs)
            }
            Err(e) => {
                // Dropping would abort too; aborting explicitly says so.
                if let Err(abort) = txn.abort() {
                    tracing::warn!("aborting a failed store transaction: {abort}");
                }
                Err(e)
            }
        }
    }

    fn commit_one(&self, ops: Vec<Op>) -> Result<u64, StoreError> {
        let revs = self.commit_many(vec![ops])?;
        Ok(revs.first().copied().unwrap_or(0))
    }
}

impl Store for RedbStore {
    fn commit(&self, ops: Vec<Op>) -> Result<u64, StoreError> {
        if ops.is_empty() {
            return self.revision();
        }
        let lock = || self.group.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = lock();
        let ticket = st.next;
        st.next += 1;
        st.queue.push((ticket, ops));
        loop {
            if let Some(result) = st.results.remove(&ticket) {
                return result;
            }
            if st.writing {
                st = self.group.done.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.writing = true;
            let group = std::mem::take(&mut st.queue);
            drop(st);
            let writing = Writing(&self.group);
            let results = self.write_group(group);
            st = lock();
            st.results.extend(results);
            // Clears `writing` and wakes the waiters (after `st` is
            // released: the guard locks the state itself).
            drop(st);
            drop(writing);
            st = lock();
        }
    }

    fn revision(&self) -> Result<u64, StoreError> {
        self.read(read_revision)
    }

    fn app(&self, key: &AppKey) -> Result<Option<App>, StoreError> {
        self.read(|t| get(t, &app_key(key)))
    }

    fn apps(&self, tenant: Option<&TenantId>) -> Result<Vec<App>, StoreError> {
        self.read(|t| scan(t, tenant.map(TenantId::as_str)))
    }

    fn task(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        self.read(|t| get(t, id.as_str()))
    }

    fn tasks(&self, tenant: Option<&TenantId>) -> Result<Vec<Task>, StoreError> {
        let all: Vec<Task> = self.read(|t| scan(t, None))?;
        Ok(match tenant {
            None => all,
            Some(tn) => all.into_iter().filter(|t| &t.tenant == tn).collect(),
        })
    }

    fn placement(&self, instance: &InstanceId) -> Result<Option<Placement>, StoreError> {
        self.read(|t| get(t, instance.as_str()))
    }

    fn placements(&self) -> Result<Vec<Placement>, StoreError> {
        self.read(|t| scan(t, None))
    }

    fn crash(&self, key: &CrashKey) -> Result<Option<CrashRecord>, StoreError> {
        self.read(|t| get(t, &crash_key(key)))
    }

    fn crashes(&self) -> Result<Vec<CrashRecord>, StoreError> {
        self.read(|t| scan(t, None))
    }

    fn policies(&self) -> Result<Vec<StoredPolicy>, StoreError> {
        self.read(|t| scan(t, None))
    }

    fn claims(&self) -> Result<Vec<ClaimRecord>, StoreError> {
        self.read(|t| scan(t, None))
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.read(|t| {
            Ok(Snapshot {
                revision: read_revision(t)?,
                apps: scan(t, None)?,
                tasks: scan(t, None)?,
                placements: scan(t, None)?,
                crashes: scan(t, None)?,
                policies: scan(t, None)?,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations() {
        assert!(check("app", "k", None, Expect::Absent).is_ok());
        assert!(check("app", "k", Some(3), Expect::Revision(3)).is_ok());
        assert!(matches!(
            check("app", "k", Some(3), Expect::Absent),
            Err(StoreError::Exists { .. })
        ));
        let e = check("app", "acme/web", Some(4), Expect::Revision(3)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "app acme/web was changed concurrently (expected revision 3, found 4): read it again and retry"
        );
        assert!(matches!(
            check("app", "k", None, Expect::Present),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn prefixes_do_not_cover_longer_names() {
        let (lo, hi) = prefix_range("acme");
        for inside in ["acme/web", "acme/a.b-c_9"] {
            assert!(lo.as_str() <= inside && inside < hi.as_str(), "{inside}");
        }
        for outside in ["acme-2/web", "acme.x/web", "acmea/web", "acm/web"] {
            assert!(
                !(lo.as_str() <= outside && outside < hi.as_str()),
                "{outside}"
            );
        }
    }
}
