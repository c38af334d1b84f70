//! What the link needs from the cell: its instances, capacity and a change
//! feed, and starting and stopping work. [`Executor`] is the real one;
//! tests drive the link with a fake.

use crate::executor::{ExecError, Executor};
use corral_proto::wire::{AckOutcome, Message, Refusal};
use corral_proto::{Capacity, InstanceId, InstanceInfo, InstanceSpec, SpecError};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Longest stop grace the cell honours, as the local API does.
pub const MAX_GRACE: Duration = Duration::from_secs(3600);

pub trait CellRuntime: Send + Sync + 'static {
    fn total(&self) -> Capacity;
    fn available(&self) -> Capacity;
    /// Every instance the cell has, ended ones included.
    fn instances(&self) -> Vec<InstanceInfo>;
    /// Whether the cell is evacuating: it refuses bids and starts with
    /// [`Refusal::Evacuating`] and says so in every snapshot.
    fn evacuating(&self) -> bool;
    /// Fires after any change to what [`instances`](Self::instances),
    /// [`available`](Self::available) or [`evacuating`](Self::evacuating)
    /// return. Coalescing, never losing the last change.
    fn changes(&self) -> watch::Receiver<()>;
    /// Whether a root filesystem directory exists on this cell.
    fn rootfs_available(&self, rootfs: &Path) -> bool {
        rootfs.is_dir()
    }
    /// Admits `StartWork` and starts it in the background: the answer comes
    /// once it is accepted (or refused), not when it runs. Idempotent: the
    /// same id with the same spec is `Done`, even while evacuating; any
    /// other start while evacuating is refused with
    /// [`Refusal::Evacuating`].
    fn start(
        self: Arc<Self>,
        id: InstanceId,
        spec: InstanceSpec,
    ) -> impl Future<Output = AckOutcome> + Send;
    /// Accepts `StopWork`: stops the instance within `grace` and removes it,
    /// in the background. An unknown id is `Done`: it is gone.
    fn stop(
        self: Arc<Self>,
        id: InstanceId,
        grace: Duration,
    ) -> impl Future<Output = AckOutcome> + Send;
    /// The brain's picture of the cluster network ([`Message::Routes`],
    /// [`Message::Endpoints`], [`Message::Policies`]): applied in the order
    /// received. Failures are the cell's to log; the brain is not told (it
    /// sends the whole picture again on the next connection). A cell without
    /// a data plane ignores them.
    fn network(self: Arc<Self>, update: Message) -> impl Future<Output = ()> + Send {
        let _ = update;
        async {}
    }
}

/// Why the executor refused a start, in the brain's terms.
pub fn refusal_for(e: ExecError) -> Refusal {
    match e {
        ExecError::BadSpec(e) => invalid(&e),
        ExecError::BadRootfs(reason) => Refusal::Invalid { reason },
        ExecError::Conflict { id } => Refusal::Duplicate { id },
        ExecError::NoCapacity(e) => Refusal::Capacity(e),
        ExecError::Evacuating => Refusal::Evacuating,
        e @ (ExecError::Deleting { .. }
        | ExecError::NotFound(_)
        | ExecError::StopTimeout { .. }
        | ExecError::Io { .. }) => Refusal::Other {
            reason: e.to_string(),
        },
    }
}

fn invalid(e: &SpecError) -> Refusal {
    Refusal::Invalid {
        reason: e.problems.join("; "),
    }
}

/// Whole seconds of grace for the executor: rounded up, at most an hour.
pub fn grace_secs(grace: Duration) -> u64 {
    let g = grace.min(MAX_GRACE);
    g.as_secs() + u64::from(g.subsec_nanos() > 0)
}

impl CellRuntime for Executor {
    fn total(&self) -> Capacity {
        Executor::total(self)
    }

    fn available(&self) -> Capacity {
        Executor::available(self)
    }

    fn instances(&self) -> Vec<InstanceInfo> {
        self.snapshot().into_iter().map(|s| s.info).collect()
    }

    fn evacuating(&self) -> bool {
        Executor::evacuating(self).is_some()
    }

    fn changes(&self) -> watch::Receiver<()> {
        Executor::changes(self)
    }

    async fn start(self: Arc<Self>, id: InstanceId, spec: InstanceSpec) -> AckOutcome {
        // Checked here too (the executor checks again) to tell a bad spec
        // from a root filesystem this cell lacks.
        if let Err(e) = spec.validate() {
            return AckOutcome::Refused(invalid(&e));
        }
        if !self.rootfs_available(Path::new(&spec.rootfs)) {
            return AckOutcome::Refused(Refusal::RootfsUnavailable {
                rootfs: spec.rootfs,
            });
        }
        match self.start_detached(id, spec) {
            Ok(_) => AckOutcome::Done,
            Err(e) => AckOutcome::Refused(refusal_for(e)),
        }
    }

    async fn network(self: Arc<Self>, update: Message) {
        let what = update.name();
        match self.apply_network(update).await {
            Ok(Some(summary)) => tracing::info!("{what} from the brain: {summary}"),
            Ok(None) => {}
            Err(e) => tracing::error!("applying {what} from the brain: {e}"),
        }
    }

    async fn stop(self: Arc<Self>, id: InstanceId, grace: Duration) -> AckOutcome {
        if self.get(&id).is_none() {
            return AckOutcome::Done;
        }
        let secs = grace_secs(grace);
        tokio::spawn(async move {
            match self.delete(&id, Some(secs)).await {
                // NotFound: removed meanwhile, by another stop or the API.
                Ok(_) | Err(ExecError::NotFound(_)) => {}
                Err(e) => tracing::error!(instance = %id, "stopping for the brain: {e}"),
            }
        });
        AckOutcome::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::CapacityError;

    #[test]
    fn executor_errors_map_to_refusals() {
        let id = InstanceId::new("i").unwrap();
        assert_eq!(
            refusal_for(ExecError::Conflict { id: id.clone() }),
            Refusal::Duplicate { id: id.clone() }
        );
        let cap = CapacityError::Containers { total: 3 };
        assert_eq!(
            refusal_for(ExecError::NoCapacity(cap.clone())),
            Refusal::Capacity(cap)
        );
        assert_eq!(
            refusal_for(ExecError::BadSpec(SpecError {
                problems: vec!["a".into(), "b".into()]
            })),
            Refusal::Invalid {
                reason: "a; b".into()
            }
        );
        assert_eq!(refusal_for(ExecError::Evacuating), Refusal::Evacuating);
        assert!(matches!(
            refusal_for(ExecError::Deleting { id }),
            Refusal::Other { reason } if reason.contains("being deleted")
        ));
    }

    #[test]
    fn grace_rounds_up_and_is_capped() {
        assert_eq!(grace_secs(Duration::ZERO), 0);
        assert_eq!(grace_secs(Duration::from_millis(1500)), 2);
        assert_eq!(grace_secs(Duration::from_secs(10)), 10);
        assert_eq!(grace_secs(Duration::from_secs(1 << 40)), 3600);
    }
}
