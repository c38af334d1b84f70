//! The cell side of the brain protocol (see `corral_proto::wire` for the
//! conversation): a task that keeps one mutual-TLS QUIC connection to a
//! brain, tells it what the cell runs, bids for work and carries out the
//! starts and stops it is given.
//!
//! The link never blocks or stops the agent: it starts after re-adoption,
//! and while no brain is reachable it retries with [`Backoff`] (200 ms
//! doubling to 10 s, jittered), round-robin over the configured addresses,
//! and every instance keeps running. After each (re)connection the cell
//! says hello and sends a full snapshot; then deltas and events as the
//! executor's change feed fires.
//!
//! - `logic`: the pure decisions (bids, deltas, events, backoff);
//! - `runtime`: [`CellRuntime`], what the link needs from the executor;
//! - `session`: one connection's conversation.

mod logic;
mod runtime;
mod session;

pub use logic::{
    bid, bids, events_for, request_of, rootfs_path_ok, score, Backoff, CellOffer, StateTracker,
    Update,
};
pub use runtime::{grace_secs, refusal_for, CellRuntime, MAX_GRACE};

use crate::config::{BrainAddress, BrainConfig, Config};
use crate::metrics::Metrics;
use corral_link::tls::{self, Credentials, TlsError};
use corral_link::PeerIdentity;
use corral_proto::wire::{BrainId, Ipv4Net, Tag, Zone};
use corral_proto::CellId;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long the brain has to answer a hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`LinkHandle::shutdown`] waits for the goodbye to leave.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Everything the link needs besides credentials and the runtime.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub addresses: Vec<BrainAddress>,
    pub brain_id: Option<BrainId>,
    pub cell: CellId,
    pub zone: Zone,
    pub tags: BTreeSet<Tag>,
    /// The cell's instance subnet, announced in the hello.
    pub subnet: Option<Ipv4Net>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub hello_timeout: Duration,
}

impl LinkSettings {
    /// From the agent's configuration, when it has a `[brain]` table.
    pub fn from_config(cfg: &Config) -> Option<Self> {
        let brain = cfg.brain.as_ref()?;
        Some(Self {
            addresses: brain.addresses.clone(),
            brain_id: brain.brain_id.clone(),
            cell: cfg.cell_id.clone(),
            zone: cfg.zone.clone(),
            tags: cfg.tags.clone(),
            subnet: cfg
                .subnet
                .and_then(|s| Ipv4Net::new(s.network(), s.prefix()).ok()),
            backoff_initial: Backoff::INITIAL,
            backoff_max: Backoff::MAX,
            hello_timeout: HELLO_TIMEOUT,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("[brain] credentials: {0}")]
    Tls(#[from] TlsError),
    #[error(
        "brain.cert {path} is the certificate of {found}, not of this cell ({cell}): \
         issue one with `corral-brain certs issue --dir <certs dir> --cell {cell}`"
    )]
    NotThisCell {
        path: PathBuf,
        found: PeerIdentity,
        cell: CellId,
    },
}

/// Reads the `[brain]` certificate files and checks that they are usable
/// and name this cell. `corral-agent --check` and the agent's start both
/// call it, so a wrong file is found before anything runs.
pub fn load_credentials(cfg: &BrainConfig, cell: &CellId) -> Result<Credentials, CredentialsError> {
    let creds = Credentials::from_files(&cfg.ca, &cfg.cert, &cfg.key)?;
    let ours = PeerIdentity::Cell(cell.clone());
    if *creds.identity() != ours {
        return Err(CredentialsError::NotThisCell {
            path: cfg.cert.clone(),
            found: creds.identity().clone(),
            cell: cell.clone(),
        });
    }
    // Builds the TLS configuration once: a key that does not parse fails here.
    tls::client_config(&creds, cfg.brain_id.as_ref())?;
    Ok(creds)
}

/// What the link is doing, for tests and operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// The brain of the established session, and its address.
    pub connected: Option<(BrainId, SocketAddr)>,
    /// Sessions established so far.
    pub sessions: u64,
    /// Why the last attempt or session ended.
    pub last_error: Option<String>,
}

/// The running link; dropping it leaves the task running until the runtime
/// ends.
pub struct LinkHandle {
    status: watch::Receiver<LinkStatus>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl LinkHandle {
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.status.clone()
    }

    /// Says goodbye to the brain (close code `Normal`) and stops the task.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let mut task = self.task;
        if tokio::time::timeout(SHUTDOWN_WAIT, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Starts the link. Needs a tokio runtime; fails only if the TLS
/// configuration cannot be built.
pub fn spawn<R: CellRuntime>(
    settings: LinkSettings,
    creds: Credentials,
    runtime: Arc<R>,
    metrics: Arc<Metrics>,
) -> Result<LinkHandle, TlsError> {
    tls::client_config(&creds, settings.brain_id.as_ref())?;
    let (status_tx, status) = watch::channel(LinkStatus::default());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let link = session::Link::new(settings, creds, runtime, metrics, status_tx, shutdown_rx);
    let task = tokio::spawn(link.run());
    Ok(LinkHandle {
        status,
        shutdown,
        task,
    })
}
