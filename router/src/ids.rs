//! Small integer ids for services and backends, and the pool that hands
//! them out.
//!
//! Ids live in `1..=limit` (0 means "none" in the maps). An id goes through
//! three states: *live* (held by an entry of the table), *pending* (its
//! entry was removed from the table, but the maps may still hold it) and
//! *free*. Only free ids are handed out, oldest-freed first, and an id
//! becomes free only when the caller says the maps no longer hold it
//! (`ServiceTable::release`). Counting
//! pending ids against the limit is what guarantees the kernel maps, sized
//! to the same limits, never overflow while a plan is half applied.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::num::NonZeroU32;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(NonZeroU32);

        impl $name {
            /// `None` for the reserved 0.
            pub const fn new(n: u32) -> Option<Self> {
                match NonZeroU32::new(n) {
                    Some(n) => Some(Self(n)),
                    None => None,
                }
            }

            /// The number written into the maps.
            pub const fn get(self) -> u32 {
                self.0.get()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$name> for NonZeroU32 {
            fn from(id: $name) -> NonZeroU32 {
                id.0
            }
        }
    };
}

id!(
    /// A service's number in the maps (`corral_lb_service.id`, the
    /// `service` half of a ring key).
    ServiceId
);
id!(
    /// A backend's number in the maps (key of `lb_backends`, element of
    /// the backend lists and rings).
    BackendId
);

/// Hands out ids in `1..=limit`; see the module docs for the life of an id.
#[derive(Debug, Clone)]
pub(crate) struct IdPool {
    limit: u32,
    /// The next never-used id.
    fresh: u32,
    /// Freed ids, oldest first.
    free: VecDeque<NonZeroU32>,
    live: u32,
    pending: BTreeSet<NonZeroU32>,
}

impl IdPool {
    pub(crate) fn new(limit: u32) -> IdPool {
        IdPool {
            limit,
            fresh: 1,
            free: VecDeque::new(),
            live: 0,
            pending: BTreeSet::new(),
        }
    }

    /// A pool in which `occupied` (all within `1..=limit`) are pending,
    /// as after a restart that found them in the maps.
    pub(crate) fn with_pending(limit: u32, occupied: &BTreeSet<NonZeroU32>) -> IdPool {
        let fresh = occupied.last().map_or(1, |id| id.get().saturating_add(1));
        let free = (1..fresh)
            .filter_map(NonZeroU32::new)
            .filter(|id| !occupied.contains(id))
            .collect();
        IdPool {
            limit,
            fresh,
            free,
            live: 0,
            pending: occupied.clone(),
        }
    }

    /// How many more ids can be made live now.
    pub(crate) fn available(&self) -> u32 {
        self.limit
            .saturating_sub(self.live)
            .saturating_sub(self.pending_count())
    }

    pub(crate) fn pending_count(&self) -> u32 {
        u32::try_from(self.pending.len()).unwrap_or(u32::MAX)
    }

    pub(crate) fn limit(&self) -> u32 {
        self.limit
    }

    pub(crate) fn live(&self) -> u32 {
        self.live
    }

    /// A free id made live, `None` when `available() == 0`.
    pub(crate) fn take(&mut self) -> Option<NonZeroU32> {
        if self.available() == 0 {
            return None;
        }
        let id = match self.free.pop_front() {
            Some(id) => id,
            None => {
                // live + pending + free == fresh - 1, and available > 0 with
                // nothing free means fresh <= limit.
                let id = NonZeroU32::new(self.fresh)?;
                self.fresh = self.fresh.checked_add(1)?;
                id
            }
        };
        self.live += 1;
        Some(id)
    }

    /// A live id whose entry left the table.
    pub(crate) fn retire(&mut self, id: NonZeroU32) {
        self.live = self.live.saturating_sub(1);
        self.pending.insert(id);
    }

    /// A pending id taken back by the entry it stood for.
    pub(crate) fn revive(&mut self, id: NonZeroU32) {
        if self.pending.remove(&id) {
            self.live += 1;
        }
    }

    /// A pending id the maps no longer hold: free for anyone.
    pub(crate) fn release(&mut self, id: NonZeroU32) {
        if self.pending.remove(&id) {
            self.free.push_back(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u32) -> NonZeroU32 {
        NonZeroU32::new(i).unwrap()
    }

    #[test]
    fn ids_are_reused_oldest_freed_first_and_only_after_release() {
        let mut pool = IdPool::new(4);
        let ids: Vec<_> = (0..4).map(|_| pool.take().unwrap().get()).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert_eq!(pool.take(), None);
        pool.retire(n(3));
        pool.retire(n(1));
        // Retired but not released: still occupied.
        assert_eq!(pool.available(), 0);
        assert_eq!(pool.take(), None);
        pool.release(n(3));
        pool.release(n(1));
        assert_eq!(pool.take(), Some(n(3)));
        assert_eq!(pool.take(), Some(n(1)));
        assert_eq!(pool.take(), None);
    }

    #[test]
    fn a_revived_id_is_live_again() {
        let mut pool = IdPool::new(2);
        let a = pool.take().unwrap();
        pool.retire(a);
        pool.revive(a);
        assert_eq!(
            (pool.live(), pool.pending_count(), pool.available()),
            (1, 0, 1)
        );
        pool.release(a); // not pending: no effect
        assert_eq!(pool.take(), Some(n(2)));
    }

    #[test]
    fn a_pool_rebuilt_from_the_maps_skips_their_ids() {
        let occupied: BTreeSet<_> = [n(2), n(5)].into();
        let mut pool = IdPool::with_pending(6, &occupied);
        assert_eq!(pool.available(), 4);
        let got: Vec<_> = (0..4).map(|_| pool.take().unwrap().get()).collect();
        assert_eq!(got, [1, 3, 4, 6]);
        assert_eq!(pool.take(), None);
        pool.release(n(5));
        assert_eq!(pool.take(), Some(n(5)));
    }
}
