//! Capacity accounting: what a cell has, what its instances hold, and
//! whether a new instance fits.

use crate::instance::{InstanceSpec, InstanceState};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub containers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CapacityError {
    #[error("not enough memory: requested {requested} MB, {free} MB free of {total} MB")]
    Memory {
        requested: u64,
        free: u64,
        total: u64,
    },
    #[error("not enough disk: requested {requested} MB, {free} MB free of {total} MB")]
    Disk {
        requested: u64,
        free: u64,
        total: u64,
    },
    #[error("no container slot free: all {total} are in use")]
    Containers { total: u64 },
}

impl Capacity {
    /// What one instance holds while it has a container.
    pub fn of(spec: &InstanceSpec) -> Self {
        Self {
            memory_mb: spec.resources.memory_mb,
            disk_mb: spec.resources.disk_mb,
            containers: 1,
        }
    }

    /// Whether an instance in `state` holds its resources. Ended instances
    /// keep only their logs and exit status.
    pub fn holds(state: InstanceState) -> bool {
        !state.is_final()
    }

    /// `total` minus what the given instances hold, floored at zero.
    pub fn available<'a>(
        total: Capacity,
        instances: impl IntoIterator<Item = (&'a InstanceSpec, InstanceState)>,
    ) -> Capacity {
        let used = instances
            .into_iter()
            .filter(|(_, st)| Self::holds(*st))
            .fold(Capacity::default(), |acc, (spec, _)| {
                acc.plus(Self::of(spec))
            });
        Capacity {
            memory_mb: total.memory_mb.saturating_sub(used.memory_mb),
            disk_mb: total.disk_mb.saturating_sub(used.disk_mb),
            containers: total.containers.saturating_sub(used.containers),
        }
    }

    pub fn plus(self, o: Capacity) -> Capacity {
        Capacity {
            memory_mb: self.memory_mb.saturating_add(o.memory_mb),
            disk_mb: self.disk_mb.saturating_add(o.disk_mb),
            containers: self.containers.saturating_add(o.containers),
        }
    }

    /// Checks that `request` fits into `available` (of `total`).
    pub fn check_fit(
        total: Capacity,
        available: Capacity,
        request: Capacity,
    ) -> Result<(), CapacityError> {
        if request.containers > available.containers {
            return Err(CapacityError::Containers {
                total: total.containers,
            });
        }
        if request.memory_mb > available.memory_mb {
            return Err(CapacityError::Memory {
                requested: request.memory_mb,
                free: available.memory_mb,
                total: total.memory_mb,
            });
        }
        if request.disk_mb > available.disk_mb {
            return Err(CapacityError::Disk {
                requested: request.disk_mb,
                free: available.disk_mb,
                total: total.disk_mb,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(mem: u64, disk: u64) -> InstanceSpec {
        let mut s: InstanceSpec = serde_json::from_str(
            r#"{"tenant":"a","app":"b","kind":"lrp","rootfs":"/r","command":["x"],"resources":{"memory_mb":8}}"#,
        )
        .unwrap();
        s.resources.memory_mb = mem;
        s.resources.disk_mb = disk;
        s
    }

    const TOTAL: Capacity = Capacity {
        memory_mb: 1000,
        disk_mb: 2000,
        containers: 3,
    };

    #[test]
    fn ended_instances_hold_nothing() {
        let a = spec(100, 100);
        let b = spec(200, 300);
        let avail = Capacity::available(
            TOTAL,
            [
                (&a, InstanceState::Running),
                (&b, InstanceState::Exited),
                (&b, InstanceState::Stopping),
            ],
        );
        assert_eq!(
            avail,
            Capacity {
                memory_mb: 700,
                disk_mb: 1600,
                containers: 1
            }
        );
    }

    #[test]
    fn refusals_say_why() {
        let avail = Capacity {
            memory_mb: 256,
            disk_mb: 2000,
            containers: 2,
        };
        let e = Capacity::check_fit(TOTAL, avail, Capacity::of(&spec(512, 1))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "not enough memory: requested 512 MB, 256 MB free of 1000 MB"
        );
        let full = Capacity {
            containers: 0,
            ..avail
        };
        assert!(matches!(
            Capacity::check_fit(TOTAL, full, Capacity::of(&spec(1, 1))),
            Err(CapacityError::Containers { total: 3 })
        ));
    }

    proptest! {
        #[test]
        fn admitting_only_what_fits_never_overcommits(reqs in proptest::collection::vec((1u64..600, 1u64..900), 0..20)) {
            let mut admitted: Vec<InstanceSpec> = Vec::new();
            for (m, d) in reqs {
                let s = spec(m, d);
                let avail = Capacity::available(TOTAL, admitted.iter().map(|s| (s, InstanceState::Running)));
                if Capacity::check_fit(TOTAL, avail, Capacity::of(&s)).is_ok() {
                    admitted.push(s);
                }
            }
            let used = admitted.iter().fold(Capacity::default(), |a, s| a.plus(Capacity::of(s)));
            prop_assert!(used.memory_mb <= TOTAL.memory_mb);
            prop_assert!(used.disk_mb <= TOTAL.disk_mb);
            prop_assert!(used.containers <= TOTAL.containers);
        }
    }
}
