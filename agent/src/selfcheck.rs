//! The agent's own health, as systemd's watchdog sees it (see
//! `corral_systemd::watchdog`): a keep-alive is sent only after
//!
//! - the API answers `GET /readyz` with 200 on its unix socket (the
//!   runtime schedules, the listener accepts, re-adoption is complete);
//! - the executor's instance table can be read (no lock held forever);
//! - the eBPF data plane, when there is one, answers a map lookup and its
//!   pins are still in bpffs.
//!
//! A stuck agent is restarted by systemd; instances are not touched by that
//! (their shims live on, the new agent re-adopts them).

use crate::executor::Executor;
use corral_systemd::probe;
use corral_systemd::Check;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the check needs: the API socket and the executor.
#[derive(Clone)]
pub struct SelfCheck {
    pub socket: PathBuf,
    pub exec: Arc<Executor>,
}

impl SelfCheck {
    pub async fn run(self) -> Check {
        api_ready(&self.socket).await?;
        let exec = self.exec;
        // Blocking: a lock held forever must hang this thread, not a worker.
        tokio::task::spawn_blocking(move || {
            exec.snapshot();
            match exec.plane() {
                Some(plane) => plane.probe().map_err(|e| format!("the data plane: {e}")),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| format!("the executor check panicked: {e}"))?
    }
}

async fn api_ready(socket: &Path) -> Check {
    let what = || format!("the API on {}", socket.display());
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("{}: {e}", what()))?;
    let r = probe::get(stream, "/readyz")
        .await
        .map_err(|e| format!("{}: {e}", what()))?;
    if r.status != 200 {
        return Err(format!(
            "{} answered /readyz with {}: {}",
            what(),
            r.status,
            r.body.trim()
        ));
    }
    Ok(())
}
