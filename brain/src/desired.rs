//! The desired-state model: apps (desired LRPs), tasks, where instances were
//! placed, crash records, and the events that announce changes. Pure: no
//! I/O, no clock (times are arguments), no randomness.
//!
//! Two counters tell versions apart:
//! - `revision` (on every record) is the store revision of its last write,
//!   like etcd's `mod_revision`; it is what compare-and-swap writes check.
//! - `App::version` counts changes to *what an instance runs* (rootfs,
//!   command, env, resources, ports, tags). Scaling does not bump it, so
//!   convergence can tell "start more of the same" from "replace instances".

use corral_proto::health::HealthCheck;
use corral_proto::instance::MAX_INDEX;
use corral_proto::service::{check_ports, port_numbers, PortSpec, Transport};
use corral_proto::wire::{Tag, MAX_TAGS};
use corral_proto::{
    AppId, CellId, IdError, InstanceId, InstanceKind, InstanceSpec, Resources, TenantId, Timestamp,
};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

/// Most instances one app may ask for.
pub const MAX_INSTANCES: u32 = 1000;

/// A task's id. Same rules as an [`InstanceId`]: a task runs as one
/// instance, under this id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TaskId(InstanceId);

impl TaskId {
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        const KIND: &str = "task id";
        match InstanceId::new(value) {
            Ok(id) => Ok(Self(id)),
            Err(IdError::Empty { .. }) => Err(IdError::Empty { kind: KIND }),
            Err(IdError::TooLong { value, .. }) => Err(IdError::TooLong { kind: KIND, value }),
            Err(IdError::BadChars { value, .. }) => Err(IdError::BadChars { kind: KIND, value }),
        }
    }

    /// A fresh id from 64 bits of entropy supplied by the caller.
    pub fn from_entropy(bits: u64) -> Result<Self, IdError> {
        Self::new(format!("task-{bits:016x}"))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The id of the instance that runs this task.
    pub fn instance_id(&self) -> &InstanceId {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl std::str::FromStr for TaskId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A desired long-running process: `instances` copies of one spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub name: AppId,
    pub tenant: TenantId,
    /// How many instances should run (0..=[`MAX_INSTANCES`]).
    pub instances: u32,
    pub rootfs: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    /// What its instances serve (each with its protocol, and the port it
    /// is published under on every node, if any).
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Placement tags a cell must all have to run an instance.
    #[serde(default)]
    pub tags: BTreeSet<Tag>,
    /// What makes an instance ready for traffic (and, once it was ready,
    /// alive); absent: a TCP check of its first TCP port, or, without one,
    /// running is ready.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// The app's service address, from `[network] vip_range`: given by the
    /// store when the app first has ports, kept until it is deleted.
    #[serde(default)]
    pub vip: Option<Ipv4Addr>,
    /// Starts at 1; bumped when what an instance runs changes (not on scaling).
    pub version: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Store revision of the last write (set by the store).
    #[serde(default)]
    pub revision: u64,
}

impl App {
    /// What instance `index` of this app runs.
    pub fn instance_spec(&self, index: u32) -> InstanceSpec {
        InstanceSpec {
            tenant: self.tenant.clone(),
            app: self.name.clone(),
            index,
            kind: InstanceKind::Lrp,
            rootfs: self.rootfs.clone(),
            command: self.command.clone(),
            env: self.env.clone(),
            resources: self.resources.clone(),
            ports: port_numbers(&self.ports),
            health_check: self.health_check(),
        }
    }

    /// Every problem with this app, at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.instances > MAX_INSTANCES {
            p.push(format!(
                "instances {} is outside 0..={MAX_INSTANCES}",
                self.instances
            ));
        }
        check_tags(&self.tags, &mut p);
        p.extend(check_ports(&self.ports));
        // The ports are checked above, as the app gives them.
        let mut spec = self.instance_spec(0);
        spec.ports.clear();
        // Only a check the app gives: the default one follows the ports.
        spec.health_check.clone_from(&self.health_check);
        if let Err(e) = spec.validate() {
            p.extend(e.problems);
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    /// The check its instances run: the app's own, or Cloud Foundry's
    /// default "port" check (a TCP connect to the first TCP port).
    pub fn health_check(&self) -> Option<HealthCheck> {
        self.health_check.clone().or_else(|| {
            self.ports
                .iter()
                .find(|p| p.protocol == Transport::Tcp)
                .map(|p| HealthCheck::tcp(p.port))
        })
    }

    fn runs_same_as(&self, o: &App) -> bool {
        (
            &self.rootfs,
            &self.command,
            &self.env,
            &self.resources,
            &self.ports,
            &self.tags,
            &self.health_check,
        ) == (
            &o.rootfs,
            &o.command,
            &o.env,
            &o.resources,
            &o.ports,
            &o.tags,
            &o.health_check,
        )
    }

    /// The key of the app within a store: names are unique per tenant.
    pub fn key(&self) -> AppKey {
        AppKey {
            tenant: self.tenant.clone(),
            name: self.name.clone(),
        }
    }
}

/// An app's identity: names are unique within a tenant, not across tenants,
/// so one tenant's names never constrain (or reveal) another's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AppKey {
    pub tenant: TenantId,
    pub name: AppId,
}

impl fmt::Display for AppKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.name)
    }
}

fn check_tags(tags: &BTreeSet<Tag>, p: &mut Vec<String>) {
    if tags.len() > MAX_TAGS {
        p.push(format!("{} tags, more than {MAX_TAGS}", tags.len()));
    }
}

fn one() -> u32 {
    1
}

/// The body of `POST /v1/apps`. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApp {
    pub name: AppId,
    /// Required with the admin token; with a tenant token it may be left out
    /// and must otherwise name the token's tenant.
    #[serde(default)]
    pub tenant: Option<TenantId>,
    #[serde(default = "one")]
    pub instances: u32,
    pub rootfs: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    /// Each a number (TCP) or `{"port", "protocol", "published"}`.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub tags: BTreeSet<Tag>,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

impl NewApp {
    /// The app this request creates in `tenant`, validated.
    pub fn into_app(self, tenant: TenantId, now: Timestamp) -> Result<App, Vec<String>> {
        let app = App {
            name: self.name,
            tenant,
            instances: self.instances,
            rootfs: self.rootfs,
            command: self.command,
            env: self.env,
            resources: self.resources,
            ports: self.ports,
            tags: self.tags,
            health_check: self.health_check,
            vip: None,
            version: 1,
            created_at: now,
            updated_at: now,
            revision: 0,
        };
        app.validate().map(|()| app)
    }
}

/// A change to some of a [`Resources`]' fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesPatch {
    pub memory_mb: Option<u64>,
    pub disk_mb: Option<u64>,
    pub cpu_weight: Option<u32>,
    pub max_pids: Option<u32>,
}

/// The body of `PATCH /v1/apps/{name}`: fields left out stay as they are.
/// `resources` changes only the fields it names; `env`, `command`, `ports`
/// and `tags` are replaced whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppPatch {
    pub instances: Option<u32>,
    pub rootfs: Option<String>,
    pub command: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub resources: Option<ResourcesPatch>,
    pub ports: Option<Vec<PortSpec>>,
    pub tags: Option<BTreeSet<Tag>>,
    pub health_check: Option<HealthCheck>,
}

impl AppPatch {
    /// The app after this patch, validated; `None` when nothing changes.
    pub fn apply(&self, app: &App, now: Timestamp) -> Result<Option<App>, Vec<String>> {
        let mut new = app.clone();
        if let Some(n) = self.instances {
            new.instances = n;
        }
        if let Some(r) = &self.rootfs {
            new.rootfs.clone_from(r);
        }
        if let Some(c) = &self.command {
            new.command.clone_from(c);
        }
        if let Some(e) = &self.env {
            new.env.clone_from(e);
        }
        if let Some(r) = &self.resources {
            let res = &mut new.resources;
            res.memory_mb = r.memory_mb.unwrap_or(res.memory_mb);
            res.disk_mb = r.disk_mb.unwrap_or(res.disk_mb);
            res.cpu_weight = r.cpu_weight.unwrap_or(res.cpu_weight);
            res.max_pids = r.max_pids.unwrap_or(res.max_pids);
        }
        if let Some(p) = &self.ports {
            new.ports.clone_from(p);
        }
        if let Some(t) = &self.tags {
            new.tags.clone_from(t);
        }
        if let Some(c) = &self.health_check {
            new.health_check = Some(c.clone());
        }
        new.validate()?;
        if new == *app {
            return Ok(None);
        }
        if !new.runs_same_as(app) {
            new.version = app.version.saturating_add(1);
        }
        new.updated_at = now;
        Ok(Some(new))
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Accepted, waiting to be placed (or to be placed again after its cell
    /// was lost).
    Pending,
    /// Placed on a cell and started there.
    Running,
    /// Ran to completion with exit code 0.
    Succeeded,
    /// Ran to completion with another code, was killed, or could not start.
    Failed,
}

impl TaskState {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub finished_at: Timestamp,
}

/// What a task runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub rootfs: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    #[serde(default)]
    pub tags: BTreeSet<Tag>,
}

/// A one-off task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub tenant: TenantId,
    /// A label grouping tasks (the app it belongs to); it need not name an
    /// existing app. Defaults to the task id.
    pub app: AppId,
    pub spec: TaskSpec,
    pub state: TaskState,
    /// The cell it runs or ran on.
    #[serde(default)]
    pub cell: Option<CellId>,
    #[serde(default)]
    pub result: Option<TaskResult>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default)]
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task {task} cannot go from {from} to {to}")]
pub struct TaskTransitionError {
    pub task: TaskId,
    pub from: &'static str,
    pub to: &'static str,
}

impl Task {
    /// What the task's instance runs.
    pub fn instance_spec(&self) -> InstanceSpec {
        InstanceSpec {
            tenant: self.tenant.clone(),
            app: self.app.clone(),
            index: 0,
            kind: InstanceKind::Task,
            rootfs: self.spec.rootfs.clone(),
            command: self.spec.command.clone(),
            env: self.spec.env.clone(),
            resources: self.spec.resources.clone(),
            ports: Vec::new(),
            health_check: None,
        }
    }

    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        check_tags(&self.spec.tags, &mut p);
        if let Err(e) = self.instance_spec().validate() {
            p.extend(e.problems);
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    /// Moves the task to `to`. Allowed: pending → running (on `cell`),
    /// running → pending (its cell was lost), pending/running → succeeded or
    /// failed (with `result`). An ended task never changes again; repeating
    /// the current non-final state is a no-op.
    pub fn transition(
        &mut self,
        to: TaskState,
        cell: Option<CellId>,
        result: Option<TaskResult>,
        now: Timestamp,
    ) -> Result<(), TaskTransitionError> {
        use TaskState as S;
        let ok = matches!(
            (self.state, to),
            (
                S::Pending,
                S::Pending | S::Running | S::Succeeded | S::Failed
            ) | (
                S::Running,
                S::Running | S::Pending | S::Succeeded | S::Failed
            )
        );
        if !ok {
            return Err(TaskTransitionError {
                task: self.id.clone(),
                from: self.state.as_str(),
                to: to.as_str(),
            });
        }
        self.state = to;
        match to {
            S::Pending => self.cell = None,
            S::Running => self.cell = cell.or(self.cell.take()),
            S::Succeeded | S::Failed => {
                if cell.is_some() {
                    self.cell = cell;
                }
                self.result = result;
            }
        }
        self.updated_at = now;
        Ok(())
    }
}

/// The body of `POST /v1/tasks`. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    #[serde(default)]
    pub tenant: Option<TenantId>,
    /// The task's label; defaults to its id.
    #[serde(default)]
    pub app: Option<AppId>,
    pub rootfs: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    #[serde(default)]
    pub tags: BTreeSet<Tag>,
}

impl NewTask {
    /// The pending task this request creates, validated.
    pub fn into_task(
        self,
        id: TaskId,
        tenant: TenantId,
        now: Timestamp,
    ) -> Result<Task, Vec<String>> {
        let app = match self.app {
            Some(a) => a,
            None => AppId::new(id.as_str()).map_err(|e| vec![e.to_string()])?,
        };
        let task = Task {
            id,
            tenant,
            app,
            spec: TaskSpec {
                rootfs: self.rootfs,
                command: self.command,
                env: self.env,
                resources: self.resources,
                tags: self.tags,
            },
            state: TaskState::Pending,
            cell: None,
            result: None,
            created_at: now,
            updated_at: now,
            revision: 0,
        };
        task.validate().map(|()| task)
    }
}

/// What a placed instance is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Workload {
    /// Instance `index` of an app, started from the app's `version`.
    Lrp {
        app: AppId,
        index: u32,
        version: u64,
    },
    Task {
        task: TaskId,
    },
}

/// An instance the brain has assigned to a cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub instance: InstanceId,
    pub cell: CellId,
    pub tenant: TenantId,
    pub workload: Workload,
    pub since: Timestamp,
    #[serde(default)]
    pub revision: u64,
}

/// Which instance slot a crash record counts: an app's index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CrashKey {
    pub tenant: TenantId,
    pub app: AppId,
    pub index: u32,
}

impl fmt::Display for CrashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.app, self.index)
    }
}

/// The crash history of one instance slot, input to the restart backoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashRecord {
    pub key: CrashKey,
    /// Crashes since the count was last reset.
    pub count: u32,
    pub last_at: Timestamp,
    pub last_reason: String,
    #[serde(default)]
    pub revision: u64,
}

impl CrashRecord {
    /// `previous` with one more crash (or a first record).
    pub fn bump(previous: Option<CrashRecord>, key: CrashKey, at: Timestamp, reason: &str) -> Self {
        CrashRecord {
            count: previous.map_or(0, |p| p.count).saturating_add(1),
            key,
            last_at: at,
            last_reason: reason.to_owned(),
            revision: 0,
        }
    }
}

/// A cross-tenant network policy as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    #[serde(flatten)]
    pub rule: corral_proto::policy::PolicyRule,
    pub created_at: Timestamp,
    #[serde(default)]
    pub revision: u64,
}

/// A change to desired state, as `GET /v1/events` streams it. `revision` is
/// the store revision that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ChangeEvent {
    #[serde(rename = "app.created")]
    AppCreated { revision: u64, app: App },
    #[serde(rename = "app.updated")]
    AppUpdated { revision: u64, app: App },
    #[serde(rename = "app.deleted")]
    AppDeleted {
        revision: u64,
        tenant: TenantId,
        name: AppId,
    },
    #[serde(rename = "task.created")]
    TaskCreated { revision: u64, task: Task },
    #[serde(rename = "task.updated")]
    TaskUpdated { revision: u64, task: Task },
    #[serde(rename = "policy.created")]
    PolicyCreated { revision: u64, policy: StoredPolicy },
    #[serde(rename = "policy.deleted")]
    PolicyDeleted { revision: u64, policy: StoredPolicy },
}

impl ChangeEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::AppCreated { .. } => "app.created",
            Self::AppUpdated { .. } => "app.updated",
            Self::AppDeleted { .. } => "app.deleted",
            Self::TaskCreated { .. } => "task.created",
            Self::TaskUpdated { .. } => "task.updated",
            Self::PolicyCreated { .. } => "policy.created",
            Self::PolicyDeleted { .. } => "policy.deleted",
        }
    }

    pub fn revision(&self) -> u64 {
        match self {
            Self::AppCreated { revision, .. }
            | Self::AppUpdated { revision, .. }
            | Self::AppDeleted { revision, .. }
            | Self::TaskCreated { revision, .. }
            | Self::TaskUpdated { revision, .. }
            | Self::PolicyCreated { revision, .. }
            | Self::PolicyDeleted { revision, .. } => *revision,
        }
    }

    /// The tenant the change belongs to: the app's or task's, or for a
    /// policy the tenant whose instances it opens.
    pub fn tenant(&self) -> &TenantId {
        match self {
            Self::AppCreated { app, .. } | Self::AppUpdated { app, .. } => &app.tenant,
            Self::AppDeleted { tenant, .. } => tenant,
            Self::TaskCreated { task, .. } | Self::TaskUpdated { task, .. } => &task.tenant,
            Self::PolicyCreated { policy, .. } | Self::PolicyDeleted { policy, .. } => {
                &policy.rule.to
            }
        }
    }

    /// Whether `tenant` may see the change: its own apps and tasks, and
    /// the policies that name it on either side (as `GET /v1/policies`
    /// lists them).
    pub fn concerns(&self, tenant: &TenantId) -> bool {
        match self {
            Self::PolicyCreated { policy, .. } | Self::PolicyDeleted { policy, .. } => {
                &policy.rule.from == tenant || &policy.rule.to == tenant
            }
            _ => self.tenant() == tenant,
        }
    }
}

// Indices run 0..instances; keep them representable as instance indices.
const _: () = assert!(MAX_INSTANCES <= MAX_INDEX);

#[cfg(test)]
mod tests {
    use super::*;

    fn new_app(json: &str) -> Result<NewApp, serde_json::Error> {
        serde_json::from_str(json)
    }

    fn app() -> App {
        new_app(
            r#"{"name":"web","instances":2,"rootfs":"/r","command":["/bin/sh"],
                "resources":{"memory_mb":64},"ports":[8080]}"#,
        )
        .unwrap()
        .into_app(TenantId::new("acme").unwrap(), Timestamp(5))
        .unwrap()
    }

    #[test]
    fn a_new_app_gets_defaults_and_version_one() {
        let a = app();
        assert_eq!((a.version, a.instances, a.revision), (1, 2, 0));
        assert_eq!(a.resources.disk_mb, 1024);
        assert_eq!(a.created_at, Timestamp(5));
        let one =
            new_app(r#"{"name":"w","rootfs":"/r","command":["x"],"resources":{"memory_mb":8}}"#)
                .unwrap();
        assert_eq!(one.instances, 1);
    }

    #[test]
    fn bad_new_apps_report_every_problem() {
        let a = new_app(
            r#"{"name":"web","instances":1001,"rootfs":"rel","command":[],
                "resources":{"memory_mb":1,"cpu_weight":0}}"#,
        )
        .unwrap();
        let p = a
            .into_app(TenantId::new("acme").unwrap(), Timestamp(0))
            .unwrap_err();
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(p[0].contains("instances 1001"), "{p:?}");
        assert!(new_app(
            r#"{"name":"../x","rootfs":"/r","command":["x"],"resources":{"memory_mb":8}}"#
        )
        .is_err());
        assert!(new_app(
            r#"{"name":"x","rootfs":"/r","command":["x"],"resources":{"memory_mb":8},"replicas":3}"#
        )
        .is_err());
    }

    #[test]
    fn scaling_keeps_the_version_and_spec_changes_bump_it() {
        let a = app();
        let scaled = AppPatch {
            instances: Some(5),
            ..Default::default()
        }
        .apply(&a, Timestamp(9))
        .unwrap()
        .unwrap();
        assert_eq!((scaled.instances, scaled.version), (5, 1));
        assert_eq!(scaled.updated_at, Timestamp(9));
        let p: AppPatch = serde_json::from_str(r#"{"resources":{"memory_mb":128}}"#).unwrap();
        let bigger = p.apply(&a, Timestamp(9)).unwrap().unwrap();
        assert_eq!(bigger.version, 2);
        assert_eq!(bigger.resources.memory_mb, 128);
        assert_eq!(bigger.resources.disk_mb, 1024, "other resources stay");
    }

    #[test]
    fn a_patch_that_changes_nothing_is_none_and_a_bad_one_is_refused() {
        let a = app();
        assert_eq!(AppPatch::default().apply(&a, Timestamp(9)).unwrap(), None);
        let same = AppPatch {
            instances: Some(2),
            ..Default::default()
        };
        assert_eq!(same.apply(&a, Timestamp(9)).unwrap(), None);
        let bad: AppPatch =
            serde_json::from_str(r#"{"instances":5000,"resources":{"memory_mb":0}}"#).unwrap();
        assert_eq!(bad.apply(&a, Timestamp(9)).unwrap_err().len(), 2);
        assert!(serde_json::from_str::<AppPatch>(r#"{"name":"other"}"#).is_err());
        assert!(serde_json::from_str::<AppPatch>(r#"{"resources":{"memory_gb":1}}"#).is_err());
    }

    #[test]
    fn ports_take_a_protocol_and_a_published_port_and_are_all_checked() {
        let a = new_app(
            r#"{"name":"dns","rootfs":"/r","command":["x"],"resources":{"memory_mb":8},
                "ports":[53, {"port":53,"protocol":"udp"}, {"port":80,"published":30080}]}"#,
        )
        .unwrap()
        .into_app(TenantId::new("acme").unwrap(), Timestamp(1))
        .unwrap();
        assert_eq!(a.instance_spec(0).ports, vec![53, 80], "numbers, once each");
        assert_eq!(a.vip, None, "the store gives VIPs");
        let bad = new_app(
            r#"{"name":"x","rootfs":"/r","command":["x"],"resources":{"memory_mb":0},
                "ports":[0, 80, 80, {"port":81,"published":0}]}"#,
        )
        .unwrap()
        .into_app(TenantId::new("acme").unwrap(), Timestamp(1))
        .unwrap_err();
        assert_eq!(bad.len(), 4, "{bad:?}");
        assert_eq!(
            bad.iter().filter(|p| *p == "port 0 is not a port").count(),
            1
        );
        // A patch replaces the ports and bumps the version; a bare number
        // and its object form are the same port.
        let p: AppPatch =
            serde_json::from_str(r#"{"ports":[{"port":8080,"protocol":"tcp"}]}"#).unwrap();
        assert_eq!(p.apply(&app(), Timestamp(9)).unwrap(), None);
        let p: AppPatch =
            serde_json::from_str(r#"{"ports":[{"port":8080,"published":30000}]}"#).unwrap();
        assert_eq!(p.apply(&app(), Timestamp(9)).unwrap().unwrap().version, 2);
        // Records stored before ports had protocols still read.
        let mut v = serde_json::to_value(app()).unwrap();
        v["ports"] = serde_json::json!([8080]);
        v.as_object_mut().unwrap().remove("vip");
        let old: App = serde_json::from_value(v).unwrap();
        assert_eq!(old, app());
    }

    fn task() -> Task {
        serde_json::from_str::<NewTask>(
            r#"{"rootfs":"/r","command":["/bin/true"],"resources":{"memory_mb":8}}"#,
        )
        .unwrap()
        .into_task(
            TaskId::from_entropy(0xabc).unwrap(),
            TenantId::new("acme").unwrap(),
            Timestamp(1),
        )
        .unwrap()
    }

    #[test]
    fn task_ids_and_specs() {
        let t = task();
        assert_eq!(t.id.as_str(), "task-0000000000000abc");
        assert_eq!(t.id.instance_id().as_str(), "task-0000000000000abc");
        let s = t.instance_spec();
        assert_eq!(
            (s.kind, s.app.as_str()),
            (InstanceKind::Task, "task-0000000000000abc")
        );
        assert!(TaskId::new("../x").is_err());
        assert!(TaskId::new("").unwrap_err().to_string().contains("task id"));
    }

    #[test]
    fn task_transitions() {
        let cell = CellId::new("cell-1").unwrap();
        let mut t = task();
        t.transition(TaskState::Running, Some(cell.clone()), None, Timestamp(2))
            .unwrap();
        assert_eq!(t.cell.as_ref(), Some(&cell));
        t.transition(TaskState::Pending, None, None, Timestamp(3))
            .unwrap();
        assert_eq!(t.cell, None, "requeued after its cell was lost");
        let result = TaskResult {
            exit_code: Some(0),
            reason: None,
            finished_at: Timestamp(4),
        };
        t.transition(TaskState::Succeeded, Some(cell), Some(result), Timestamp(4))
            .unwrap();
        let e = t
            .transition(TaskState::Running, None, None, Timestamp(5))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "task task-0000000000000abc cannot go from succeeded to running"
        );
    }

    #[test]
    fn events_serialize_with_their_type_and_tenant() {
        let e = ChangeEvent::AppCreated {
            revision: 7,
            app: app(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "app.created");
        assert_eq!(v["app"]["name"], "web");
        assert_eq!(
            (e.name(), e.revision(), e.tenant().as_str()),
            ("app.created", 7, "acme")
        );
    }

    #[test]
    fn crash_records_count_up() {
        let key = CrashKey {
            tenant: TenantId::new("a").unwrap(),
            app: AppId::new("b").unwrap(),
            index: 3,
        };
        let r1 = CrashRecord::bump(None, key.clone(), Timestamp(1), "oom");
        let r2 = CrashRecord::bump(Some(r1), key, Timestamp(2), "exit 1");
        assert_eq!((r2.count, r2.last_reason.as_str()), (2, "exit 1"));
    }
}
