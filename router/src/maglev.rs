//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4), with weights.
//!
//! A lookup table of `M` slots (M prime) is filled so that each backend owns
//! about `M · weight / Σweights` slots; a flow goes to `table[hash % M]`.
//!
//! Each backend has a *preference list*, a permutation of the slots derived
//! only from its stable key: `offset = h1(key) % M`,
//! `skip = h2(key) % (M − 1) + 1`, `permutation[j] = (offset + j · skip) % M`
//! (M prime makes every such sequence visit each slot exactly once). Backends
//! take turns claiming the next slot of their list that is still free until
//! the table is full. Because a backend's list does not depend on the other
//! backends or on its position in the input, adding or removing one backend
//! mostly leaves every other backend's slots where they were.
//!
//! # Turns and weights
//!
//! Backends take turns in order of their keys (never in input order, so the
//! table depends only on the *set* of backends). With weights, each backend
//! earns `weight` credit per round and takes a turn whenever its credit
//! reaches the largest weight `w_max`; a backend of weight `w_max` takes a
//! turn every round, one of weight `w` about `w / w_max` of the rounds. Every
//! turn claims exactly one slot.
//!
//! # Bounds (what the property tests check)
//!
//! - Every slot is filled as soon as there is one backend.
//! - Equal weights: every backend takes one turn per round, and the table
//!   fills part-way through a round, so each backend owns `⌊M/N⌋` or
//!   `⌈M/N⌉` slots: its share is within **one slot** of `M/N`.
//! - Weights: after `r` whole rounds backend `i` has had `⌊r·wᵢ/w_max⌋`
//!   turns and the last, partial round gives it at most one more, so its
//!   count is `r·wᵢ/w_max + δᵢ` with `δᵢ ∈ (−1, 1]`. Summing over the `N`
//!   backends and eliminating `r` gives
//!   `|countᵢ − M·wᵢ/W| < 1 + N·wᵢ/W` (W = Σw), i.e. at most `N + 1`
//!   slots and usually one or two.
//! - Disruption: removing one of `N` backends must move its own `≈ M/N`
//!   slots. Maglev moves some more, because the survivors' turns shift and
//!   they claim the freed slots in a different order. Measured over 1,000
//!   random sets each (M from [`table_size_for`], one random backend
//!   removed), in units of `M/N`:
//!
//!   | N | mean | 99th percentile | worst |
//!   |---|---|---|---|
//!   | 12 | 1.07 | 1.13 | 2.12 |
//!   | 30 | 1.25 | 1.33 | 1.88 |
//!   | 71 | 1.81 | 2.03 | 2.46 |
//!   | 100 | 2.33 | 2.55 | 2.85 |
//!
//!   The typical extra is about `0.2 · √(N/M)` of the table (under 2 % of
//!   `M` while `M ≥ 100·N`). The tail comes from two backends that draw the
//!   same skip (probability about `N²/2M` per table): they walk the same
//!   cycle of slots one behind the other, and any change reshuffles their
//!   two shares. (Giving the second one another skip was tried: it halves
//!   that tail for most removals but doubles it when its partner goes, and
//!   makes a preference list depend on other backends; not kept.) The tests
//!   assert **`moved ≤ 2·M/N + 0.03·M`**: one share for the removed backend,
//!   one for a colliding pair, 3 % for the turn shifts; adding a backend to
//!   `N` obeys the same bound with `N + 1`. This is the price of Maglev's
//!   even spread (a ring hash moves exactly `M/N` but balances far worse).
//!   Established flows do not notice: the data plane keeps them on their
//!   backend through its connection table; the extra only matters for
//!   flows whose connection entry is lost.
//!
//! # Table size
//!
//! [`table_size_for`] picks `M`: [`DEFAULT_TABLE_SIZE`] (16,381) while that
//! leaves at least [`SLOTS_PER_BACKEND`] (100) slots per backend, otherwise
//! the smallest prime `≥ 100·N`, never above [`MAX_TABLE_SIZE`] (131,071,
//! the prime 2¹⁷ − 1; 512 KiB of `u32` per table). 100 slots per backend
//! keeps the imbalance under 1 % and the extra disruption small (the paper
//! recommends `M ≫ N`); the cap bounds the memory of one table. `M` depends
//! only on `N`, never on history, so every cell that sees the same backends
//! builds the same table: a flow that ECMP sends to another node still lands
//! on the same backend.

use std::num::NonZeroU16;

/// The table size used while it leaves [`SLOTS_PER_BACKEND`] slots to each
/// backend (up to 163 backends); prime.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;

/// The largest table [`table_size_for`] chooses (2¹⁷ − 1, prime).
pub const MAX_TABLE_SIZE: u32 = 131_071;

/// The number of slots per backend below which [`table_size_for`] grows the
/// table.
pub const SLOTS_PER_BACKEND: u32 = 100;

/// Seeds of the two key hashes (offset and skip). Changing them changes
/// every table, so they are fixed forever: every cell must build the same
/// table from the same backends.
const OFFSET_SEED: u64 = 0x6a09_e667_f3bc_c908;
const SKIP_SEED: u64 = 0xbb67_ae85_84ca_a73b;

/// The weight of a backend: how many turns it gets relative to the others.
/// Never zero (a backend that should get no traffic is left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Weight(NonZeroU16);

impl Weight {
    /// Weight 1, the weight of every backend when weights are not used.
    pub const ONE: Weight = Weight(NonZeroU16::MIN);

    /// `None` for 0.
    pub const fn new(weight: u16) -> Option<Weight> {
        match NonZeroU16::new(weight) {
            Some(w) => Some(Weight(w)),
            None => None,
        }
    }

    /// The weight as a number (≥ 1).
    pub const fn get(self) -> u16 {
        self.0.get()
    }
}

impl Default for Weight {
    fn default() -> Self {
        Weight::ONE
    }
}

/// One backend as Maglev sees it: a stable key (e.g. address and port, see
/// `BackendAddr::maglev_key`) and a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Identifies the backend across changes; its preference list is
    /// derived from this key alone.
    pub key: u64,
    /// Relative number of slots.
    pub weight: Weight,
}

/// Why a table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// The table size must be prime for the preference lists to be
    /// permutations.
    #[error("maglev table size {size} is not prime")]
    SizeNotPrime {
        /// The size asked for.
        size: u32,
    },
    /// Fewer slots than backends: some backends would get none.
    #[error("maglev table size {size} is smaller than the {backends} backends it must hold")]
    TooSmall {
        /// The size asked for.
        size: u32,
        /// The number of backends.
        backends: usize,
    },
    /// Two backends with the same key would have the same preference list
    /// and could not be told apart.
    #[error("two maglev backends have the same key {key:#x}")]
    DuplicateKey {
        /// The repeated key.
        key: u64,
    },
}

/// A filled Maglev lookup table: slot → index of a backend in the slice
/// given to [`populate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    slots: Vec<u32>,
}

impl Table {
    /// The number of slots, `M`.
    pub fn size(&self) -> u32 {
        // `populate` never builds more than u32::MAX slots: the size is a u32.
        u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
    }

    /// Every slot, in order: the index into the input slice of the backend
    /// that owns it.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// The backend (input index) a flow hash maps to: `slots[hash % M]`.
    pub fn lookup(&self, hash: u64) -> u32 {
        let m = self.slots.len() as u64;
        // `slots` is never empty (M ≥ 2), so the index is in range.
        self.slots[(hash % m) as usize]
    }

    /// How many slots each backend owns, by input index.
    pub fn counts(&self, backends: usize) -> Vec<u32> {
        let mut counts = vec![0u32; backends];
        for &s in &self.slots {
            if let Some(c) = counts.get_mut(s as usize) {
                *c += 1;
            }
        }
        counts
    }
}

/// The table size for `backends` backends: [`DEFAULT_TABLE_SIZE`] up to 163
/// backends, then the smallest prime `≥ 100 · backends`, at most
/// [`MAX_TABLE_SIZE`] (see the module docs for why).
pub fn table_size_for(backends: usize) -> u32 {
    let wanted = u32::try_from(backends)
        .ok()
        .and_then(|n| n.checked_mul(SLOTS_PER_BACKEND))
        .unwrap_or(u32::MAX);
    if wanted <= DEFAULT_TABLE_SIZE {
        return DEFAULT_TABLE_SIZE;
    }
    if wanted >= MAX_TABLE_SIZE {
        return MAX_TABLE_SIZE;
    }
    // A prime exists between `wanted` and MAX_TABLE_SIZE (itself prime).
    next_prime(wanted).map_or(MAX_TABLE_SIZE, |p| p.min(MAX_TABLE_SIZE))
}

/// Whether `n` is prime (trial division; fine for table sizes).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 || n % 3 == 0 {
        return false;
    }
    let n = u64::from(n);
    let mut d: u64 = 5;
    while d * d <= n {
        if n % d == 0 || n % (d + 2) == 0 {
            return false;
        }
        d += 6;
    }
    true
}

/// The smallest prime `≥ n`, `None` if it does not fit in a `u32`.
pub fn next_prime(n: u32) -> Option<u32> {
    (n.max(2)..=u32::MAX).find(|&c| is_prime(c))
}

/// A 64-bit mix (splitmix64's finaliser) of `key` under `seed`. Fixed and
/// documented, not `std`'s hasher: tables must be identical on every cell
/// and across releases.
fn mix(key: u64, seed: u64) -> u64 {
    let mut z = key ^ seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A backend's walk through its preference list.
struct Walk {
    next: u64,
    skip: u64,
}

impl Walk {
    fn new(key: u64, m: u64) -> Walk {
        Walk {
            next: mix(key, OFFSET_SEED) % m,
            skip: mix(key, SKIP_SEED) % (m - 1) + 1,
        }
    }

    /// The next slot of the preference list that is still free; claims it.
    /// There is one as long as the table is not full, because the list is
    /// a permutation of all the slots.
    fn claim(&mut self, table: &mut [u32], owner: u32, m: u64) {
        loop {
            let slot = self.next as usize;
            self.next = (self.next + self.skip) % m;
            if table[slot] == EMPTY {
                table[slot] = owner;
                return;
            }
        }
    }
}

const EMPTY: u32 = u32::MAX;

/// Builds the lookup table of `size` slots for `backends`.
///
/// Returns `Ok(None)` when there are no backends: there is nothing to hash
/// to, and the caller must say so (refuse or drop) rather than use a table.
/// The result depends only on the set of `(key, weight)` pairs: the same
/// backends in any order give the same table (up to the indices, which
/// refer to the input slice).
pub fn populate(backends: &[Entry], size: u32) -> Result<Option<Table>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime { size });
    }
    if backends.is_empty() {
        return Ok(None);
    }
    if (size as usize) < backends.len() {
        return Err(MaglevError::TooSmall {
            size,
            backends: backends.len(),
        });
    }
    let mut order: Vec<u32> = (0..backends.len() as u32).collect();
    order.sort_by_key(|&i| backends[i as usize].key);
    if let Some(pair) = order
        .windows(2)
        .find(|p| backends[p[0] as usize].key == backends[p[1] as usize].key)
    {
        return Err(MaglevError::DuplicateKey {
            key: backends[pair[0] as usize].key,
        });
    }

    let m = u64::from(size);
    let w_max = backends.iter().map(|b| b.weight.get()).max().unwrap_or(1);
    let w_max = u32::from(w_max);
    let mut walks: Vec<Walk> = backends.iter().map(|b| Walk::new(b.key, m)).collect();
    let mut credit = vec![0u32; backends.len()];
    let mut table = vec![EMPTY; size as usize];
    let mut filled: u32 = 0;
    // Each round gives the heaviest backend a turn, so this ends after at
    // most `size` rounds.
    loop {
        for &i in &order {
            let i_us = i as usize;
            credit[i_us] += u32::from(backends[i_us].weight.get());
            if credit[i_us] < w_max {
                continue;
            }
            credit[i_us] -= w_max;
            walks[i_us].claim(&mut table, i, m);
            filled += 1;
            if filled == size {
                return Ok(Some(Table { slots: table }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries(keys: &[u64]) -> Vec<Entry> {
        keys.iter()
            .map(|&key| Entry {
                key,
                weight: Weight::ONE,
            })
            .collect()
    }

    /// The table as backend keys (so tables built from different input
    /// orders or sets can be compared).
    fn keyed(backends: &[Entry], size: u32) -> Vec<u64> {
        let table = populate(backends, size).unwrap().unwrap();
        table
            .slots()
            .iter()
            .map(|&i| backends[i as usize].key)
            .collect()
    }

    fn moved(a: &[u64], b: &[u64]) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(MAX_TABLE_SIZE));
        assert!(is_prime(65_537));
        assert!(!is_prime(16_383)); // 3 · 43 · 127
        assert!(!is_prime(25_921)); // 161²
        assert_eq!(next_prime(16_382), Some(16_411));
        assert_eq!(next_prime(0), Some(2));
        assert_eq!(next_prime(u32::MAX), None); // 2³² − 1 = 3 · 5 · 17 · 257 · 65537
        assert_eq!(next_prime(4_294_967_291), Some(4_294_967_291));
    }

    #[test]
    fn table_size_rule() {
        assert_eq!(table_size_for(0), DEFAULT_TABLE_SIZE);
        assert_eq!(table_size_for(1), DEFAULT_TABLE_SIZE);
        assert_eq!(table_size_for(163), DEFAULT_TABLE_SIZE);
        assert_eq!(table_size_for(164), 16_411);
        assert_eq!(table_size_for(256), 25_601);
        assert_eq!(table_size_for(1_310), 131_009);
        assert_eq!(table_size_for(1_311), MAX_TABLE_SIZE);
        assert_eq!(table_size_for(usize::MAX), MAX_TABLE_SIZE);
        for n in [0, 5, 200, 1_000, 5_000] {
            let m = table_size_for(n);
            assert!(is_prime(m));
            assert!((DEFAULT_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&m));
            assert!(m >= (100 * n as u32).min(MAX_TABLE_SIZE));
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert_eq!(
            populate(&entries(&[1]), 16_383),
            Err(MaglevError::SizeNotPrime { size: 16_383 })
        );
        assert_eq!(
            populate(&entries(&[1, 2, 3, 4]), 3),
            Err(MaglevError::TooSmall {
                size: 3,
                backends: 4
            })
        );
        assert_eq!(
            populate(&entries(&[7, 1, 7]), 13),
            Err(MaglevError::DuplicateKey { key: 7 })
        );
    }

    #[test]
    fn zero_backends_give_no_table() {
        assert_eq!(populate(&[], DEFAULT_TABLE_SIZE), Ok(None));
    }

    #[test]
    fn one_backend_owns_every_slot() {
        let t = populate(&entries(&[42]), 13).unwrap().unwrap();
        assert_eq!(t.slots(), &[0; 13]);
        assert_eq!(t.lookup(12_345), 0);
    }

    #[test]
    fn the_table_is_fixed_forever() {
        // Every cell (and every release) must build the same table from the
        // same backends; this pins the hash and the turn order.
        let t = keyed(&entries(&[10, 20, 30]), 13);
        assert_eq!(t, [30, 10, 10, 10, 30, 20, 20, 30, 30, 10, 20, 10, 20]);
    }

    #[test]
    fn weights_set_the_shares() {
        let backends = vec![
            Entry {
                key: 1,
                weight: Weight::new(1).unwrap(),
            },
            Entry {
                key: 2,
                weight: Weight::new(3).unwrap(),
            },
        ];
        let t = populate(&backends, DEFAULT_TABLE_SIZE).unwrap().unwrap();
        let counts = t.counts(2);
        // 16381 / 4 = 4095.25
        assert!((4094..=4097).contains(&counts[0]), "{counts:?}");
        assert_eq!(counts[0] + counts[1], DEFAULT_TABLE_SIZE);
    }

    /// 1..=max distinct keys, as a (deliberately unsorted) vector.
    fn distinct_keys(max: usize) -> impl Strategy<Value = Vec<u64>> {
        proptest::collection::btree_set(any::<u64>(), 1..=max)
            .prop_map(|s| s.into_iter().collect::<Vec<_>>())
            .prop_shuffle()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn equal_weights_fill_every_slot_within_one_of_the_fair_share(
            keys in distinct_keys(64),
            size in prop::sample::select(vec![13u32, 251, 1_021, DEFAULT_TABLE_SIZE]),
        ) {
            prop_assume!(keys.len() <= size as usize);
            let t = populate(&entries(&keys), size).unwrap().unwrap();
            prop_assert_eq!(t.size(), size);
            prop_assert!(t.slots().iter().all(|&i| (i as usize) < keys.len()));
            let (lo, hi) = (size / keys.len() as u32, size.div_ceil(keys.len() as u32));
            for c in t.counts(keys.len()) {
                prop_assert!(c >= lo && c <= hi, "count {} outside [{}, {}]", c, lo, hi);
            }
        }

        #[test]
        fn weighted_shares_are_proportional(
            backends in proptest::collection::btree_map(any::<u64>(), 1u16..=100, 1..=32),
        ) {
            let entries: Vec<Entry> = backends
                .iter()
                .map(|(&key, &w)| Entry { key, weight: Weight::new(w).unwrap() })
                .collect();
            let m = DEFAULT_TABLE_SIZE;
            let t = populate(&entries, m).unwrap().unwrap();
            let total: f64 = entries.iter().map(|e| f64::from(e.weight.get())).sum();
            let n = entries.len() as f64;
            for (e, c) in entries.iter().zip(t.counts(entries.len())) {
                let share = f64::from(e.weight.get()) / total;
                let fair = f64::from(m) * share;
                let bound = 1.0 + n * share;
                prop_assert!(
                    (f64::from(c) - fair).abs() <= bound,
                    "weight {} owns {} slots, fair {:.1}, bound {:.1}", e.weight.get(), c, fair, bound
                );
            }
        }

        #[test]
        fn the_table_does_not_depend_on_input_order(
            keys in distinct_keys(40),
            weights in proptest::collection::vec(1u16..=5, 40),
        ) {
            let mut a: Vec<Entry> = keys
                .iter()
                .zip(&weights)
                .map(|(&key, &w)| Entry { key, weight: Weight::new(w).unwrap() })
                .collect();
            let first = keyed(&a, 1_021);
            a.reverse();
            prop_assert_eq!(&first, &keyed(&a, 1_021));
            a.sort_by_key(|e| e.key);
            prop_assert_eq!(&first, &keyed(&a, 1_021));
        }

        #[test]
        fn removing_a_backend_moves_at_most_two_shares_and_3_percent(
            keys in distinct_keys(100),
            victim in any::<prop::sample::Index>(),
        ) {
            prop_assume!(keys.len() >= 2);
            let m = table_size_for(keys.len());
            let before = keyed(&entries(&keys), m);
            let mut fewer = keys.clone();
            let gone = fewer.remove(victim.index(keys.len()));
            let after = keyed(&entries(&fewer), m);
            let n = keys.len() as f64;
            let moved = moved(&before, &after) as f64;
            let own = before.iter().filter(|&&k| k == gone).count() as f64;
            // Its own slots must move; everything else is the extra.
            prop_assert!(moved >= own);
            let bound = 2.0 * f64::from(m) / n + 0.03 * f64::from(m);
            prop_assert!(moved <= bound, "{} of {} slots moved removing 1 of {} (bound {:.0})", moved, m, n, bound);
        }

        #[test]
        fn adding_a_backend_moves_at_most_two_shares_and_3_percent(
            keys in distinct_keys(100),
            extra in any::<u64>(),
        ) {
            prop_assume!(!keys.contains(&extra));
            let m = table_size_for(keys.len() + 1);
            let before = keyed(&entries(&keys), m);
            let mut more = keys.clone();
            more.push(extra);
            let after = keyed(&entries(&more), m);
            let n1 = more.len() as f64;
            let moved = moved(&before, &after) as f64;
            let bound = 2.0 * f64::from(m) / n1 + 0.03 * f64::from(m);
            prop_assert!(moved <= bound, "{} of {} slots moved adding 1 to {} (bound {:.0})", moved, m, keys.len(), bound);
        }
    }
}
