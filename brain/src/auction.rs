//! The auctioneer's placement core: given a batch of pending starts and a
//! view of the cells, decide which cell runs each start. Pure: no I/O, no
//! clock, no randomness; the same view and batch always give the same
//! placements.
//!
//! # The baseline: Diego's auction
//!
//! [`run_auction`] follows Cloud Foundry Diego's auctioneer
//! (`auctionrunner/scheduler.go`, `rep/resources.go`):
//!
//! 1. **Order the batch.** Long-running instances before tasks; among
//!    long-running instances, index 0 first (so that every app gets one
//!    instance before any gets a second when capacity is short), then larger
//!    memory requests first (large items are the hard ones to fit; placing
//!    them first is the classic "largest first" heuristic), then larger disk.
//!    Remaining ties go by tenant, app, index and id, so the order is total.
//! 2. **Filter the cells** for each item: the cell has every placement tag
//!    the item asks for, offers its root filesystem, is not draining, and has
//!    a container slot, the memory and the disk it asks for free.
//! 3. **Spread across zones first** (long-running instances only): only the
//!    cells of the zones holding the fewest instances of the app compete; a
//!    zone holding more is considered only when no cell of the emptier
//!    zones fits. Draining cells do not count: their instances are leaving.
//! 4. **Score** each remaining cell; the lowest score wins, ties go to the
//!    lowest cell id:
//!
//!    ```text
//!    score = resources + starting_weight × containers starting on the cell
//!                      + app_penalty × instances of the same app on the cell   (LRPs only)
//!
//!    (by default a cell is spared the starting weight for its even share
//!    of the starts in flight, see [`AuctionConfig::round_share`])
//!    resources (Diego) = mean of the used fractions of memory, disk and
//!                        container slots, after placing the item
//!    ```
//!
//!    With Diego's constants ([`AuctionConfig::diego`]): `starting_weight`
//!    = 0.25 (Diego's default `starting_container_weight`) and `app_penalty`
//!    = 1000 (Diego's `LocalityOffset`). The resource term lies in `[0, 1]`,
//!    so a penalty of 1000 makes "fewer instances of this app here" decide
//!    before any difference in load: an app's instances land on distinct
//!    cells while there are cells enough. The starting weight makes four
//!    starts in flight on a cell worth a whole cell's worth of load, which
//!    keeps a fresh, empty cell from receiving a whole batch at once (a start
//!    storm).
//! 5. **Update the working view** after each placement (capacity, starting
//!    count, the app's instances on the cell and in its zone), so that the
//!    next item of the same batch sees it, and the batch spreads.
//!
//! An item that fits nowhere gets a [`PlacementError`] saying why, e.g. "no
//! cell has 512 MB free: largest free is 256 MB on cell-2".
//!
//! # What this implementation improves, and how it was measured
//!
//! *Speed* (same placements, proven by a property test against
//! [`reference::run_auction`], a direct transcription of Diego's loop):
//!
//! - Diego recounts an app's instances in every zone and looks them up in
//!   every cell's map for every item: O(items × cells) map lookups keyed by
//!   strings. Here each distinct app of a batch is counted once into dense
//!   per-cell and per-zone arrays, which placements then update in place.
//! - Tag, root-filesystem and draining filters are evaluated once per
//!   distinct (tags, rootfs) requirement in the batch, not once per item and
//!   cell; the per-item scan walks a precomputed list of eligible cells over
//!   flat arrays of free capacity.
//! - A cell in a zone holding more of the app than the best cell found so far
//!   is skipped before it is scored.
//!
//! *Balance*: Diego's resource term is the plain mean of three fractions, so
//! it does not look at the *shape* of the request: a memory-heavy instance
//! is as happy on a cell with little memory free but lots of disk as on the
//! opposite. [`Scoring::Balanced`] scores the sum of squared used fractions
//! after placement instead. Its marginal cost grows with the fraction
//! already used in exactly the dimensions the item needs, so memory-heavy
//! items go where memory is free and disk-heavy items where disk is, and
//! each dimension stays level on its own. It is the default; `Scoring::Mean`
//! keeps Diego's.
//!
//! *Memory first*: the squares are weighted, memory's three times
//! ([`AuctionConfig::memory_weight`]): `(3m² + d² + c²) / 5`. Memory is what
//! a PaaS cell runs out of first and what quotas count, and a level memory
//! floor is what the last starts of a push need. Those come in a round of
//! their own, and its largest items (a 4 GB instance is 5 % of an 80 GiB
//! cell) land on the emptiest cells; a cell that then gets one ends about
//! that much above one that does not. The final spread is therefore
//! roughly the floor's unevenness plus that step, so the floor has to be
//! as level as it can be. With even weights the
//! three dimensions were traded against each other, and small items (most
//! of them, where disk and container slots outweigh their memory) were
//! placed by disk and slots: memory drifted to a 3.4-4.1 % spread before
//! the last round. Measured in process (`cargo xtask bench auction --half
//! --batch 16384 --trace`, the end-to-end run's sizes, seeds 0xc077a1 and
//! 1-3), memory / disk / slot spread before the last batch: weight 1: 3.4-4.1
//! / 4.2-6.2 / 4.0-4.4 %; weight 3: 1.4-1.9 / 5.5-5.9 / 4.0-4.8 %; weight 5:
//! 0.9-1.1 / 7.4-8.1 / 4.4-5.6 % (disk pays, so 3). After the last batch
//! (1,696 items, under two per cell) 4.5-5.5 % whatever the weight: that
//! step. End to end (`bench auction --quic`), 10 interleaved pairs: weight
//! 1 3.9-10.0 % (over 5 % in 6), weight 3 1.7-2.8 % in 9 and 5.2 % in one;
//! over 39 runs of weight 3 a median of ~2.2 %, over 5 % in 6, when cells
//! whose reports lag are shut out of rounds by the starting weight. Their
//! lag is the brain loop's cadence: a cell whose bids just miss a loop pass
//! gets its work a pass later, and reports a round or two behind its peers.
//! [`AuctionConfig::pipeline_items`] gives the last two rounds' even share
//! as slack against that (docs/benchmarks.md, "2026-12-06 20:10 UTC").
//!
//! # Measured
//!
//! `xtask/src/bench_auction.rs`: this core alone, in process (no QUIC), 1,000
//! identical cells (80 GiB, 320 GiB disk, 250 slots, 3 zones), 100,000
//! instances of apps of 1–100 instances, 128 MB–4 GB memory and 256 MB–4 GB
//! disk drawn independently, in batches of 1,000, release build on the
//! 2-core development VM (throughput varied by ±40 % between runs with the
//! machine's load; spreads are deterministic):
//!
//! | auction | placements/s | batch p50 / p99 | spread at ½ memory: mem / disk / slots |
//! |---|---|---|---|
//! | this, [`Scoring::Balanced`] (default) | 35,000–63,000 | 16–27 / 24–44 ms | 7.3 % / 5.1 % / 2.8 % |
//! | this, [`Scoring::Mean`] (Diego's score) | 34,000–59,000 | 17–23 / 24–50 ms | 15.8 % / 12.0 % / 2.4 % |
//! | [`reference`](mod@reference) (Diego's loop) | 885–944 | 950–1,080 / 2,300–2,800 ms | 15.8 % / 12.0 % / 2.4 % |
//!
//! All 100,000 were placed in every run; other seeds give the same picture
//! (balanced 7.0–8.1 % memory spread, Diego's 15.5–16.6 %).
//!
//! What keeps the memory spread above 5 % at the default weights is the
//! starting weight: at 0.25 per start (or even 0.02) a batch is dealt out
//! about one start per cell whatever the load, which is what protects a
//! freshly added empty cell from a start storm (see the test
//! `a_fresh_empty_cell_does_not_receive_a_whole_batch`). With
//! `starting_weight = 0` the spread falls to 5.9 % / 4.5 % / 4.8 %; the
//! default keeps Diego's 0.25 and its protection. Cubing the fractions
//! instead of squaring them traded disk balance for memory balance, with no
//! clear gain, so squares it is. What remains of the time is the scan itself
//! (O(eligible cells) per item) and, about a quarter, comparing app keys
//! while counting a batch's apps in each cell's map; a view kept across
//! batches with interned app ids would remove the latter.
//!
//! The figures above predate [`AuctionConfig::round_share`] (now the
//! default): sparing each cell its share of the starts in flight lets the
//! load, not the start count, deal out a batch. Same benchmark: memory /
//! disk / slot spread 6.2 % / 5.1 % / 4.8 % in batches of 1,000, and
//! 2.3 % / 4.6 % / 3.6 % in batches of 8,192 (19.8 % / 8.0 % / 2.0 % with
//! every start charged), which is why the brain's rounds are large. With
//! memory weighted three times (now the default): 5.5 % / 6.3 % / 6.4 %
//! in batches of 1,000, 1.3 % / 7.4 % / 4.0 % in batches of 8,192 and
//! 0.8 % / 5.7 % / 3.2 % in batches of 16,384 (1.7 % / 4.0 % / 2.4 % at
//! even weights).

use crate::desired::AppKey;
use corral_proto::wire::{Tag, WorkItem, Zone};
use corral_proto::{AppId, Capacity, CellId, InstanceId, InstanceKind, TenantId};
use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Which root filesystems a cell can run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RootfsSupport {
    /// Any (the rootfs is fetched or present everywhere).
    #[default]
    Any,
    /// Only these (preloaded stacks).
    Only(BTreeSet<String>),
    /// Any but these (the cell said it lacks them).
    Except(BTreeSet<String>),
}

impl RootfsSupport {
    pub fn offers(&self, rootfs: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(set) => set.contains(rootfs),
            Self::Except(set) => !set.contains(rootfs),
        }
    }
}

/// What the auctioneer knows of one cell. The brain leaves out cells it
/// cannot reach; a cell in the view but `draining` takes no new work. Cell
/// ids in one view are unique.
#[derive(Debug, Clone, PartialEq)]
pub struct CellView {
    pub id: CellId,
    pub zone: Zone,
    pub tags: BTreeSet<Tag>,
    pub rootfs: RootfsSupport,
    pub total: Capacity,
    pub available: Capacity,
    /// Long-running instances per app already on the cell (starting or
    /// running), including those placed earlier in the batch.
    pub app_instances: BTreeMap<AppKey, u32>,
    /// Containers currently starting on the cell.
    pub starting: u32,
    /// The cell is being drained (evacuated) and takes no new work.
    pub draining: bool,
}

impl CellView {
    /// An empty, non-draining cell without tags that runs any rootfs.
    pub fn new(id: CellId, zone: Zone, total: Capacity) -> Self {
        Self {
            id,
            zone,
            tags: BTreeSet::new(),
            rootfs: RootfsSupport::Any,
            total,
            available: total,
            app_instances: BTreeMap::new(),
            starting: 0,
            draining: false,
        }
    }

    fn instances_of(&self, app: &AppKey) -> u32 {
        self.app_instances.get(app).copied().unwrap_or(0)
    }

    /// Whether the cell may run `item` at all, capacity aside.
    fn matches(&self, item: &WorkItem) -> bool {
        item.tags.is_subset(&self.tags) && self.rootfs.offers(&item.rootfs)
    }
}

/// How the resource part of the score is computed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Diego's: the mean of the used fractions of memory, disk and container
    /// slots after placement. In `[0, 1]`.
    Mean,
    /// The sum of the squared used fractions after placement, divided by 3
    /// to stay in `[0, 1]`. Balances each dimension on its own.
    Balanced,
}

/// The auction's weights. Any finite values work; comparisons are total, so
/// even NaN weights give a deterministic (if meaningless) result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuctionConfig {
    /// The resource term. Default [`Scoring::Balanced`].
    pub scoring: Scoring,
    /// Added per container already starting on the cell. Default 0.25
    /// (Diego's `starting_container_weight`).
    pub starting_weight: f64,
    /// Added per instance of the same app already on the cell (long-running
    /// instances only). Default 1000 (Diego's `LocalityOffset`): large
    /// enough that spreading an app over cells beats any load difference.
    pub app_penalty: f64,
    /// Each cell's even share of the starts in flight plus slack (the
    /// round's share again, the median open cell's starts in flight, or
    /// the even share of the last rounds' starts, whichever is largest),
    /// `⌈(starting on the open cells + batch) / open cells⌉ +
    /// max(⌈batch / open cells⌉, median, min(⌈pipeline_items / open
    /// cells⌉, busiest))`, is not charged the starting
    /// weight: only starts beyond it are (a start is charged for the cell's
    /// total including itself). Within its share a cell is chosen by its
    /// load alone, so a large round (or several rounds in flight) is dealt
    /// out by what each item takes, not by counting starts; beyond it the
    /// weight still keeps a fresh empty cell from taking the round. Default
    /// on; Diego's auction charges every start.
    pub round_share: bool,
    /// Starts placed by the auctioneer's last rounds before this one
    /// (the brain's last two), whose reports may still be on their way.
    /// Part of [`AuctionConfig::round_share`]'s slack: a cell may have
    /// their even share in flight uncharged (no more than some open cell
    /// has in flight), because cells report their starts one by one, and a
    /// cell whose reports lag a round or two behind its peers' looks busier
    /// than it is. 0 (the default) outside a pipeline of rounds.
    pub pipeline_items: u64,
    /// How many times the memory term counts against disk's and container
    /// slots' in [`Scoring::Balanced`] (ignored by [`Scoring::Mean`]):
    /// `(w·m² + d² + c²) / (w + 2)`. Default 3: memory is what a PaaS cell
    /// runs out of first and what quotas are made of, and an even memory
    /// level before the last starts of a push arrive is what keeps its
    /// largest instances from leaving the spread wide (see the module
    /// documentation, "Memory first").
    pub memory_weight: f64,
}

impl AuctionConfig {
    /// Diego's auction exactly: mean resource score, 0.25, 1000.
    pub const fn diego() -> Self {
        Self {
            scoring: Scoring::Mean,
            starting_weight: 0.25,
            app_penalty: 1000.0,
            round_share: false,
            memory_weight: 1.0,
            pipeline_items: 0,
        }
    }
}

impl Default for AuctionConfig {
    fn default() -> Self {
        Self {
            scoring: Scoring::Balanced,
            round_share: true,
            memory_weight: 3.0,
            ..Self::diego()
        }
    }
}

/// Where one item goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub id: InstanceId,
    pub cell: CellId,
}

/// An item that fits nowhere, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub id: InstanceId,
    pub error: PlacementError,
}

/// The result of one auction, in the order the items were considered (see
/// [`batch_order`]). Every item of the batch is in exactly one of the lists.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuctionOutcome {
    pub placed: Vec<Placement>,
    pub unplaced: Vec<Unplaced>,
}

/// Why an item fits on no cell. Each check narrows the cells the next one
/// looks at, so the error names the first requirement nothing met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no cells are available")]
    NoCells,
    #[error("no cell has tags {}", TagList(.tags))]
    MissingTags { tags: BTreeSet<Tag> },
    #[error("no cell has all of the tags {}", TagList(.tags))]
    NoCellWithAllTags { tags: BTreeSet<Tag> },
    #[error("no cell with the required tags offers root filesystem {rootfs:?}")]
    RootfsUnavailable { rootfs: String },
    #[error("every matching cell is draining ({cells} cells)")]
    AllDraining { cells: usize },
    #[error("every matching cell has all its container slots in use ({cells} cells)")]
    NoContainerSlot { cells: usize },
    #[error("no cell has {requested} MB free: largest free is {largest_free} MB on {cell}")]
    Memory {
        requested: u64,
        largest_free: u64,
        cell: CellId,
    },
    #[error(
        "no cell with {memory} MB of memory free has {requested} MB of disk free: largest is {largest_free} MB on {cell}"
    )]
    Disk {
        requested: u64,
        memory: u64,
        largest_free: u64,
        cell: CellId,
    },
}

impl PlacementError {
    /// A short label for metrics ("failures by reason").
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCells => "no-cells",
            Self::MissingTags { .. } | Self::NoCellWithAllTags { .. } => "tags",
            Self::RootfsUnavailable { .. } => "rootfs",
            Self::AllDraining { .. } => "draining",
            Self::NoContainerSlot { .. } => "containers",
            Self::Memory { .. } => "memory",
            Self::Disk { .. } => "disk",
        }
    }
}

struct TagList<'a>(&'a BTreeSet<Tag>);

impl fmt::Display for TagList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(t.as_str())?;
        }
        f.write_str("}")
    }
}

fn app_key(item: &WorkItem) -> AppKey {
    AppKey {
        tenant: item.tenant.clone(),
        name: item.app.clone(),
    }
}

fn is_lrp(item: &WorkItem) -> bool {
    item.kind == InstanceKind::Lrp
}

/// The order in which a batch is placed: long-running instances before
/// tasks, index 0 first, larger memory first, larger disk first, then
/// tenant, app, index and id. Returns positions into `batch`.
pub fn batch_order<W: Borrow<WorkItem>>(batch: &[W]) -> Vec<usize> {
    fn rank(w: &WorkItem) -> (bool, bool) {
        (!is_lrp(w), !(is_lrp(w) && w.index == 0))
    }
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y): (&WorkItem, &WorkItem) = (batch[a].borrow(), batch[b].borrow());
        rank(x)
            .cmp(&rank(y))
            .then(y.resources.memory_mb.cmp(&x.resources.memory_mb))
            .then(y.resources.disk_mb.cmp(&x.resources.disk_mb))
            .then_with(|| x.tenant.cmp(&y.tenant))
            .then_with(|| x.app.cmp(&y.app))
            .then(x.index.cmp(&y.index))
            .then_with(|| x.id.cmp(&y.id))
    });
    order
}

/// What an item takes from a cell.
#[derive(Debug, Clone, Copy)]
struct Request {
    memory_mb: u64,
    disk_mb: u64,
}

impl Request {
    fn of(item: &WorkItem) -> Self {
        Self {
            memory_mb: item.resources.memory_mb,
            disk_mb: item.resources.disk_mb,
        }
    }

    fn fits(self, available: Capacity) -> bool {
        available.containers >= 1
            && available.memory_mb >= self.memory_mb
            && available.disk_mb >= self.disk_mb
    }
}

/// A cell's total capacity as reciprocals, so that scoring multiplies
/// instead of dividing (division was the scan's bottleneck). Zero stands for
/// a dimension without capacity.
#[derive(Debug, Clone, Copy)]
struct Inverse {
    memory: f64,
    disk: f64,
    containers: f64,
}

impl Inverse {
    fn of(total: Capacity) -> Self {
        let inv = |x: u64| if x == 0 { 0.0 } else { 1.0 / x as f64 };
        Self {
            memory: inv(total.memory_mb),
            disk: inv(total.disk_mb),
            containers: inv(total.containers),
        }
    }
}

/// The used fraction of a dimension after taking `req` of `free`; a
/// dimension with no capacity at all counts as full.
fn used_after(inverse: f64, free: u64, req: u64) -> f64 {
    if inverse == 0.0 {
        return 1.0;
    }
    1.0 - free.saturating_sub(req) as f64 * inverse
}

/// The score of placing `req` on a cell; both implementations call exactly
/// this, so they agree to the bit.
fn score(
    config: &AuctionConfig,
    total: Inverse,
    available: Capacity,
    req: Request,
    starting: u32,
    same_app: u32,
) -> f64 {
    let m = used_after(total.memory, available.memory_mb, req.memory_mb);
    let d = used_after(total.disk, available.disk_mb, req.disk_mb);
    let c = used_after(total.containers, available.containers, 1);
    let resources = match config.scoring {
        Scoring::Mean => (m + d + c) / 3.0,
        Scoring::Balanced => {
            let w = config.memory_weight;
            (w * m * m + d * d + c * c) / (w + 2.0)
        }
    };
    resources
        + config.starting_weight * f64::from(starting)
        + config.app_penalty * f64::from(same_app)
}

/// How many starts in flight each cell may have without being charged the
/// starting weight (see [`AuctionConfig::round_share`]): its even share of
/// the starts already in flight on the open cells plus the batch, rounded
/// up, plus slack: its share of the batch again, or what the median open
/// cell has in flight, whichever is larger. The emptier cells may take up
/// to twice the round's even share uncharged, so that a cell left behind
/// (its bids late, say) catches up within a round or two; and a cell whose
/// last round is not reported running yet (reports arrive cell by cell,
/// about one round's share apart) is not shut out of a small round, the
/// last of a push, for that alone; nor is a group of cells whose reports
/// lag a round or two behind their peers' (the even share of the last
/// rounds' items, [`AuctionConfig::pipeline_items`], though never more than
/// the busiest open cell has in flight: without starts in flight there is
/// no pipeline to lag behind). A cell holding more starts than that is
/// still charged.
/// `None` when every start is charged.
fn round_share(config: &AuctionConfig, cells: &[CellView], batch: usize) -> Option<u32> {
    if !config.round_share {
        return None;
    }
    let mut open: Vec<u32> = cells
        .iter()
        .filter(|c| !c.draining)
        .map(|c| c.starting)
        .collect();
    let starting: u64 = open.iter().map(|&s| u64::from(s)).sum();
    let batch = u64::try_from(batch).unwrap_or(u64::MAX);
    let n = (open.len() as u64).max(1);
    // The lower median: with two cells, one of them busy, the idle one's.
    let median = if open.is_empty() {
        0
    } else {
        let mid = (open.len() - 1) / 2;
        *open.select_nth_unstable(mid).1
    };
    let busiest = open.iter().copied().max().unwrap_or(0);
    let pipeline = config.pipeline_items.div_ceil(n).min(u64::from(busiest));
    let slack = batch.div_ceil(n).max(u64::from(median)).max(pipeline);
    let share = starting
        .saturating_add(batch)
        .div_ceil(n)
        .saturating_add(slack);
    Some(u32::try_from(share).unwrap_or(u32::MAX))
}

/// The starts a cell with `starting` in flight is charged for one more:
/// all of them (Diego), or those of the new total beyond its share.
fn charged(starting: u32, share: Option<u32>) -> u32 {
    match share {
        None => starting,
        Some(share) => starting.saturating_add(1).saturating_sub(share),
    }
}

/// Lower wins: fewer of the app in the zone, then the score; the caller
/// walks cells by id and keeps the first of equals.
fn better(zone_count: u32, score: f64, than: Option<(u32, f64)>) -> bool {
    match than {
        None => true,
        Some((z, s)) => match zone_count.cmp(&z) {
            Ordering::Less => true,
            Ordering::Greater => false,
            Ordering::Equal => score.total_cmp(&s) == Ordering::Less,
        },
    }
}

/// Takes `item`'s resources from `cell`.
fn take(cell: &mut CellView, item: &WorkItem, app: Option<&AppKey>) {
    let req = Request::of(item);
    cell.available.memory_mb = cell.available.memory_mb.saturating_sub(req.memory_mb);
    cell.available.disk_mb = cell.available.disk_mb.saturating_sub(req.disk_mb);
    cell.available.containers = cell.available.containers.saturating_sub(1);
    cell.starting = cell.starting.saturating_add(1);
    if let Some(app) = app {
        match cell.app_instances.get_mut(app) {
            Some(n) => *n = n.saturating_add(1),
            None => {
                cell.app_instances.insert(app.clone(), 1);
            }
        }
    }
}

/// Says why `item` fits on none of `cells` (as they are now). Only called
/// once the item has been found to fit nowhere.
fn explain(cells: &[CellView], item: &WorkItem) -> PlacementError {
    // The cell with the most of something, ties to the lowest id.
    fn largest<'a>(
        cells: &[&'a CellView],
        f: impl Fn(&CellView) -> u64,
    ) -> Option<(u64, &'a CellId)> {
        cells.iter().fold(None, |best, c| match best {
            Some((v, id)) if (v, std::cmp::Reverse(id)) >= (f(c), std::cmp::Reverse(&c.id)) => {
                Some((v, id))
            }
            _ => Some((f(c), &c.id)),
        })
    }
    if cells.is_empty() {
        return PlacementError::NoCells;
    }
    let tagged: Vec<&CellView> = cells
        .iter()
        .filter(|c| item.tags.is_subset(&c.tags))
        .collect();
    if tagged.is_empty() {
        let missing: BTreeSet<Tag> = item
            .tags
            .iter()
            .filter(|t| !cells.iter().any(|c| c.tags.contains(*t)))
            .cloned()
            .collect();
        return if missing.is_empty() {
            PlacementError::NoCellWithAllTags {
                tags: item.tags.clone(),
            }
        } else {
            PlacementError::MissingTags { tags: missing }
        };
    }
    let matching: Vec<&CellView> = tagged
        .into_iter()
        .filter(|c| c.rootfs.offers(&item.rootfs))
        .collect();
    if matching.is_empty() {
        return PlacementError::RootfsUnavailable {
            rootfs: item.rootfs.clone(),
        };
    }
    let open: Vec<&CellView> = matching.iter().copied().filter(|c| !c.draining).collect();
    if open.is_empty() {
        return PlacementError::AllDraining {
            cells: matching.len(),
        };
    }
    let slotted: Vec<&CellView> = open
        .iter()
        .copied()
        .filter(|c| c.available.containers >= 1)
        .collect();
    let req = Request::of(item);
    let Some((largest_memory, memory_cell)) = largest(&slotted, |c| c.available.memory_mb) else {
        return PlacementError::NoContainerSlot { cells: open.len() };
    };
    if largest_memory < req.memory_mb {
        return PlacementError::Memory {
            requested: req.memory_mb,
            largest_free: largest_memory,
            cell: memory_cell.clone(),
        };
    }
    let roomy: Vec<&CellView> = slotted
        .into_iter()
        .filter(|c| c.available.memory_mb >= req.memory_mb)
        .collect();
    // Not empty: the cell with the largest free memory is in it. And none
    // has the disk, or the item would have been placed.
    let (largest_disk, disk_cell) =
        largest(&roomy, |c| c.available.disk_mb).unwrap_or((0, memory_cell));
    PlacementError::Disk {
        requested: req.disk_mb,
        memory: req.memory_mb,
        largest_free: largest_disk,
        cell: disk_cell.clone(),
    }
}

/// One app of the batch: its instances per cell and per zone, kept current
/// as the batch is placed.
struct AppCounts {
    key: AppKey,
    per_cell: Vec<u32>,
    per_zone: Vec<u32>,
}

/// The working view of the fast implementation: cells sorted by id, their
/// changing numbers in flat arrays.
struct Working<'a> {
    config: &'a AuctionConfig,
    cells: &'a mut [CellView],
    /// Position in `cells` of the i-th cell by id.
    by_id: Vec<usize>,
    zone: Vec<u32>,
    zones: usize,
    total: Vec<Inverse>,
    available: Vec<Capacity>,
    starting: Vec<u32>,
    /// Starts per cell not charged the starting weight.
    share: Option<u32>,
}

impl<'a> Working<'a> {
    fn new(config: &'a AuctionConfig, cells: &'a mut [CellView], batch: usize) -> Self {
        let share = round_share(config, cells, batch);
        let mut by_id: Vec<usize> = (0..cells.len()).collect();
        by_id.sort_by(|&a, &b| cells[a].id.cmp(&cells[b].id));
        let mut zone_ids: BTreeMap<&Zone, u32> = BTreeMap::new();
        for c in cells.iter() {
            let next = u32::try_from(zone_ids.len()).unwrap_or(u32::MAX);
            zone_ids.entry(&c.zone).or_insert(next);
        }
        let zone = by_id
            .iter()
            .map(|&i| zone_ids.get(&cells[i].zone).copied().unwrap_or(0))
            .collect();
        let zones = zone_ids.len();
        let total = by_id.iter().map(|&i| Inverse::of(cells[i].total)).collect();
        let available = by_id.iter().map(|&i| cells[i].available).collect();
        let starting = by_id.iter().map(|&i| cells[i].starting).collect();
        Self {
            config,
            cells,
            by_id,
            zone,
            zones,
            total,
            available,
            starting,
            share,
        }
    }

    fn cell(&self, pos: usize) -> &CellView {
        &self.cells[self.by_id[pos]]
    }

    /// Positions of the cells that may run items with these requirements.
    fn eligible(&self, tags: &BTreeSet<Tag>, rootfs: &str) -> Vec<usize> {
        (0..self.by_id.len())
            .filter(|&pos| {
                let c = self.cell(pos);
                !c.draining && tags.is_subset(&c.tags) && c.rootfs.offers(rootfs)
            })
            .collect()
    }

    /// Counts the instances of each app (sorted by key) per cell and per
    /// zone, in one pass over the cells. A cell's map is sorted too, so each
    /// cell costs one merge of the two lists, or a lookup per app when the
    /// cell holds many more apps than the batch has.
    fn count_apps(&self, keys: Vec<AppKey>) -> Vec<AppCounts> {
        let cells = self.by_id.len();
        let mut apps: Vec<AppCounts> = keys
            .into_iter()
            .map(|key| AppCounts {
                key,
                per_cell: vec![0; cells],
                per_zone: vec![0; self.zones],
            })
            .collect();
        let k = apps.len();
        if k == 0 {
            return apps;
        }
        for pos in 0..cells {
            let c = self.cell(pos);
            let zone = self.zone[pos] as usize;
            let record = |app: &mut AppCounts, n: u32| {
                app.per_cell[pos] = n;
                if !c.draining {
                    app.per_zone[zone] += n;
                }
            };
            let m = c.app_instances.len();
            let log_m = (usize::BITS - m.leading_zeros()) as usize;
            if k.saturating_mul(log_m) <= m {
                for app in &mut apps {
                    if let Some(&n) = c.app_instances.get(&app.key) {
                        record(app, n);
                    }
                }
                continue;
            }
            let mut a = 0;
            for (key, &n) in &c.app_instances {
                while a < k && apps[a].key < *key {
                    a += 1;
                }
                if a == k {
                    break;
                }
                if apps[a].key == *key {
                    record(&mut apps[a], n);
                    a += 1;
                }
            }
        }
        apps
    }

    /// The best eligible cell for a request, if any fits.
    fn best(&self, eligible: &[usize], req: Request, app: Option<&AppCounts>) -> Option<usize> {
        let mut best: Option<(u32, f64)> = None;
        let mut winner = None;
        for &pos in eligible {
            let available = self.available[pos];
            if !req.fits(available) {
                continue;
            }
            let (zone_count, same_app) = match app {
                Some(a) => (a.per_zone[self.zone[pos] as usize], a.per_cell[pos]),
                None => (0, 0),
            };
            if matches!(best, Some((z, _)) if zone_count > z) {
                continue;
            }
            let s = score(
                self.config,
                self.total[pos],
                available,
                req,
                charged(self.starting[pos], self.share),
                same_app,
            );
            if better(zone_count, s, best) {
                best = Some((zone_count, s));
                winner = Some(pos);
            }
        }
        winner
    }

    fn place(&mut self, pos: usize, item: &WorkItem, app: Option<&mut AppCounts>) {
        let req = Request::of(item);
        let a = &mut self.available[pos];
        a.memory_mb = a.memory_mb.saturating_sub(req.memory_mb);
        a.disk_mb = a.disk_mb.saturating_sub(req.disk_mb);
        a.containers = a.containers.saturating_sub(1);
        self.starting[pos] = self.starting[pos].saturating_add(1);
        let key = match app {
            Some(app) => {
                app.per_cell[pos] += 1;
                app.per_zone[self.zone[pos] as usize] += 1;
                Some(&app.key)
            }
            None => None,
        };
        // The caller's view is kept current too, so that an error explained
        // later in the batch sees every placement before it.
        take(&mut self.cells[self.by_id[pos]], item, key);
    }
}

/// Places a batch on the cells (see the module docs), updating `cells` as
/// the placements take their capacity. `cells` may be in any order; the
/// result does not depend on it.
pub fn run_auction(
    config: &AuctionConfig,
    cells: &mut [CellView],
    batch: &[WorkItem],
) -> AuctionOutcome {
    let mut decided = Vec::with_capacity(batch.len());
    auction_by_position(config, cells, batch, |i, at| decided.push((i, at)));
    let mut outcome = AuctionOutcome::default();
    for (i, at) in decided {
        let id = batch[i].id.clone();
        match at {
            Ok(at) => outcome.placed.push(Placement {
                id,
                cell: cells[at].id.clone(),
            }),
            Err(error) => outcome.unplaced.push(Unplaced { id, error }),
        }
    }
    outcome
}

/// [`run_auction`] without building its outcome: `decided(i, where)` is
/// called for every item, in [`batch_order`], with its position in `batch`
/// and the position in `cells` of the cell it was placed on, or why it fits
/// nowhere. For a caller that keeps more than a [`WorkItem`] per item and
/// would otherwise clone the batch and look its items up by id.
pub fn auction_by_position<W: Borrow<WorkItem>>(
    config: &AuctionConfig,
    cells: &mut [CellView],
    batch: &[W],
    mut decided: impl FnMut(usize, Result<usize, PlacementError>),
) {
    let mut work = Working::new(config, cells, batch.len());
    let mut classes: BTreeMap<(&BTreeSet<Tag>, &str), Vec<usize>> = BTreeMap::new();
    // Every app of the batch, counted once, numbered in key order.
    let mut app_index: BTreeMap<(&TenantId, &AppId), usize> = batch
        .iter()
        .map(Borrow::borrow)
        .filter(|w| is_lrp(w))
        .map(|w| ((&w.tenant, &w.app), 0))
        .collect();
    let keys = app_index
        .keys()
        .map(|(tenant, name)| AppKey {
            tenant: (*tenant).clone(),
            name: (*name).clone(),
        })
        .collect();
    for (i, at) in app_index.values_mut().enumerate() {
        *at = i;
    }
    let mut apps = work.count_apps(keys);
    for i in batch_order(batch) {
        let item: &WorkItem = batch[i].borrow();
        let class = (&item.tags, item.rootfs.as_str());
        let eligible = classes
            .entry(class)
            .or_insert_with(|| work.eligible(&item.tags, &item.rootfs));
        let app = if is_lrp(item) {
            app_index.get(&(&item.tenant, &item.app)).copied()
        } else {
            None
        };
        let req = Request::of(item);
        match work.best(eligible, req, app.map(|a| &apps[a])) {
            Some(pos) => {
                work.place(pos, item, app.map(|a| &mut apps[a]));
                decided(i, Ok(work.by_id[pos]));
            }
            None => decided(i, Err(explain(work.cells, item))),
        }
    }
}

/// Diego's scheduling loop transcribed directly: for every item, count the
/// app's instances per zone and score every cell, looking everything up in
/// the cells' maps. It is the oracle that [`run_auction`] is tested against
/// (they must agree on every placement) and the baseline whose speed the
/// benchmark compares.
pub mod reference {
    use super::*;

    pub fn run_auction(
        config: &AuctionConfig,
        cells: &mut [CellView],
        batch: &[WorkItem],
    ) -> AuctionOutcome {
        let mut by_id: Vec<usize> = (0..cells.len()).collect();
        by_id.sort_by(|&a, &b| cells[a].id.cmp(&cells[b].id));
        let share = round_share(config, cells, batch.len());
        let mut outcome = AuctionOutcome::default();
        for i in batch_order(batch) {
            let item = &batch[i];
            let key = is_lrp(item).then(|| app_key(item));
            let mut zones: BTreeMap<&Zone, u32> = BTreeMap::new();
            if let Some(key) = &key {
                for c in cells.iter().filter(|c| !c.draining) {
                    *zones.entry(&c.zone).or_insert(0) += c.instances_of(key);
                }
            }
            let req = Request::of(item);
            let mut best = None;
            let mut winner = None;
            for &at in &by_id {
                let c = &cells[at];
                if c.draining || !c.matches(item) || !req.fits(c.available) {
                    continue;
                }
                let (zone_count, same_app) = match &key {
                    Some(key) => (
                        zones.get(&c.zone).copied().unwrap_or(0),
                        c.instances_of(key),
                    ),
                    None => (0, 0),
                };
                let total = Inverse::of(c.total);
                let starting = charged(c.starting, share);
                let s = score(config, total, c.available, req, starting, same_app);
                if better(zone_count, s, best) {
                    best = Some((zone_count, s));
                    winner = Some(at);
                }
            }
            match winner {
                Some(at) => {
                    take(&mut cells[at], item, key.as_ref());
                    outcome.placed.push(Placement {
                        id: item.id.clone(),
                        cell: cells[at].id.clone(),
                    });
                }
                None => outcome.unplaced.push(Unplaced {
                    id: item.id.clone(),
                    error: explain(cells, item),
                }),
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::Resources;
    use proptest::prelude::*;

    fn tag(t: &str) -> Tag {
        Tag::new(t).unwrap()
    }

    fn tags(ts: &[&str]) -> BTreeSet<Tag> {
        ts.iter().map(|t| tag(t)).collect()
    }

    fn cap(memory_mb: u64, disk_mb: u64, containers: u64) -> Capacity {
        Capacity {
            memory_mb,
            disk_mb,
            containers,
        }
    }

    fn cell(id: &str, zone: &str, memory_mb: u64) -> CellView {
        CellView::new(
            CellId::new(id).unwrap(),
            Zone::new(zone).unwrap(),
            cap(memory_mb, 100_000, 100),
        )
    }

    fn item_of(kind: InstanceKind, app: &str, index: u32, memory_mb: u64) -> WorkItem {
        WorkItem {
            id: InstanceId::new(format!("{app}-{index}")).unwrap(),
            tenant: TenantId::new("acme").unwrap(),
            app: AppId::new(app).unwrap(),
            index,
            kind,
            resources: Resources {
                memory_mb,
                disk_mb: 100,
                cpu_weight: 100,
                max_pids: 100,
            },
            rootfs: "/r".into(),
            tags: BTreeSet::new(),
        }
    }

    fn lrp(app: &str, index: u32, memory_mb: u64) -> WorkItem {
        item_of(InstanceKind::Lrp, app, index, memory_mb)
    }

    fn task(name: &str, memory_mb: u64) -> WorkItem {
        item_of(InstanceKind::Task, name, 0, memory_mb)
    }

    fn key(app: &str) -> AppKey {
        AppKey {
            tenant: TenantId::new("acme").unwrap(),
            name: AppId::new(app).unwrap(),
        }
    }

    /// Runs both implementations, checks they agree, returns where each
    /// item went (or its error message).
    fn auction(
        config: &AuctionConfig,
        cells: &mut Vec<CellView>,
        batch: &[WorkItem],
    ) -> AuctionOutcome {
        let mut copy = cells.clone();
        let fast = run_auction(config, cells, batch);
        let slow = reference::run_auction(config, &mut copy, batch);
        assert_eq!(fast, slow, "the fast auction disagrees with Diego's loop");
        assert_eq!(*cells, copy);
        fast
    }

    fn cell_of(outcome: &AuctionOutcome, id: &str) -> String {
        outcome
            .placed
            .iter()
            .find(|p| p.id.as_str() == id)
            .map(|p| p.cell.to_string())
            .unwrap_or_else(|| panic!("{id} not placed: {outcome:?}"))
    }

    fn error_of(outcome: &AuctionOutcome, id: &str) -> String {
        outcome
            .unplaced
            .iter()
            .find(|u| u.id.as_str() == id)
            .map(|u| u.error.to_string())
            .unwrap_or_else(|| panic!("{id} was placed: {outcome:?}"))
    }

    fn both() -> [AuctionConfig; 2] {
        [AuctionConfig::diego(), AuctionConfig::default()]
    }

    #[test]
    fn an_app_spreads_over_zones_then_over_cells() {
        for config in both() {
            let mut cells = vec![
                cell("a1", "za", 10_000),
                cell("a2", "za", 10_000),
                cell("b1", "zb", 10_000),
                cell("b2", "zb", 10_000),
                cell("c1", "zc", 10_000),
                cell("c2", "zc", 10_000),
            ];
            let batch: Vec<_> = (0..6).map(|i| lrp("web", i, 256)).collect();
            let out = auction(&config, &mut cells, &batch);
            assert_eq!(out.placed.len(), 6);
            for c in &cells {
                assert_eq!(c.instances_of(&key("web")), 1, "{}", c.id);
            }
            // The first three go to three different zones.
            let first: BTreeSet<_> = ["web-0", "web-1", "web-2"]
                .iter()
                .map(|id| cell_of(&out, id)[..1].to_owned())
                .collect();
            assert_eq!(first.len(), 3, "{out:?}");
        }
    }

    #[test]
    fn the_emptier_zone_wins_over_a_lighter_cell() {
        // Zone b already has the app; zone a's only cell is busier but fits.
        let mut busy = cell("a1", "za", 10_000);
        busy.available.memory_mb = 2_000;
        let mut has_app = cell("b1", "zb", 10_000);
        has_app.app_instances.insert(key("web"), 1);
        let mut cells = vec![busy, has_app, cell("b2", "zb", 10_000)];
        for config in both() {
            let out = auction(&config, &mut cells.clone(), &[lrp("web", 1, 512)]);
            assert_eq!(cell_of(&out, "web-1"), "a1");
        }
        // When zone a cannot fit it, the next zone takes it, on the cell
        // without the app.
        cells[0].available.memory_mb = 100;
        let out = auction(&AuctionConfig::default(), &mut cells, &[lrp("web", 1, 512)]);
        assert_eq!(cell_of(&out, "web-1"), "b2");
    }

    #[test]
    fn instances_on_draining_cells_do_not_count_for_zone_spread() {
        // web/0 runs on draining a1; its replacement belongs in zone a again.
        let mut draining = cell("a1", "za", 10_000);
        draining.draining = true;
        draining.app_instances.insert(key("web"), 1);
        let mut b = cell("b1", "zb", 10_000);
        b.app_instances.insert(key("web"), 1);
        let mut cells = vec![draining, cell("a2", "za", 10_000), b];
        let mut lighter = cell("b2", "zb", 10_000);
        lighter.available.memory_mb = 10_000;
        cells.push(lighter);
        let out = auction(&AuctionConfig::default(), &mut cells, &[lrp("web", 0, 512)]);
        assert_eq!(cell_of(&out, "web-0"), "a2");
    }

    #[test]
    fn index_zero_first_then_larger_memory_then_disk_then_tasks() {
        let mut big_disk = lrp("b", 3, 512);
        big_disk.resources.disk_mb = 5_000;
        let batch = vec![
            task("t-small", 64),
            lrp("a", 2, 128),
            lrp("a", 1, 2048),
            task("t-big", 4096),
            lrp("b", 0, 64),
            lrp("a", 0, 256),
            lrp("b", 4, 512),
            big_disk,
        ];
        let order: Vec<&str> = batch_order(&batch)
            .into_iter()
            .map(|i| batch[i].id.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "a-0",
                "b-0",
                "a-1",
                "b-3",
                "b-4",
                "a-2",
                "t-big-0",
                "t-small-0"
            ]
        );
    }

    #[test]
    fn a_batch_spreads_because_the_view_is_updated() {
        for config in both() {
            let mut cells: Vec<_> = (1..=4).map(|i| cell(&format!("c{i}"), "z", 4096)).collect();
            let batch: Vec<_> = (0..4).map(|i| task(&format!("t{i}"), 1024)).collect();
            let out = auction(&config, &mut cells, &batch);
            let used: BTreeSet<_> = out.placed.iter().map(|p| p.cell.clone()).collect();
            assert_eq!(used.len(), 4, "{out:?}");
            assert!(cells
                .iter()
                .all(|c| c.available.memory_mb == 3072 && c.starting == 1));
        }
    }

    #[test]
    fn ties_go_to_the_lowest_cell_id_whatever_the_input_order() {
        for config in both() {
            let mut cells = vec![
                cell("c3", "z", 4096),
                cell("c1", "z", 4096),
                cell("c2", "z", 4096),
            ];
            let out = auction(&config, &mut cells, &[task("t", 100)]);
            assert_eq!(cell_of(&out, "t-0"), "c1");
        }
    }

    #[test]
    fn scores_follow_the_documented_formula() {
        let total = cap(1000, 2000, 10);
        let available = cap(600, 1000, 5);
        let req = Request {
            memory_mb: 100,
            disk_mb: 500,
        };
        // Used after: memory 0.5, disk 0.75, containers 0.6.
        let total = Inverse::of(total);
        let mean = score(&AuctionConfig::diego(), total, available, req, 0, 0);
        assert!((mean - (0.5 + 0.75 + 0.6) / 3.0).abs() < 1e-12, "{mean}");
        let with_extras = score(&AuctionConfig::diego(), total, available, req, 2, 1);
        assert!((with_extras - (mean + 2.0 * 0.25 + 1000.0)).abs() < 1e-9);
        // Balanced: memory's square counts three times.
        let balanced = score(&AuctionConfig::default(), total, available, req, 0, 0);
        assert!((balanced - (3.0 * 0.25 + 0.5625 + 0.36) / 5.0).abs() < 1e-12);
        let even = AuctionConfig {
            memory_weight: 1.0,
            ..AuctionConfig::default()
        };
        let balanced = score(&even, total, available, req, 0, 0);
        assert!((balanced - (0.25 + 0.5625 + 0.36) / 3.0).abs() < 1e-12);
        // A dimension without capacity counts as full.
        let none = score(
            &AuctionConfig::diego(),
            Inverse::of(cap(0, 0, 0)),
            cap(0, 0, 0),
            req,
            0,
            0,
        );
        assert_eq!(none, 1.0);
    }

    #[test]
    fn starting_containers_steer_work_away() {
        let mut busy = cell("c1", "z", 4096);
        busy.starting = 3;
        let mut fuller = cell("c2", "z", 4096);
        fuller.available.memory_mb = 3000;
        for config in both() {
            let out = auction(
                &config,
                &mut vec![busy.clone(), fuller.clone()],
                &[task("t", 100)],
            );
            assert_eq!(cell_of(&out, "t-0"), "c2");
        }
    }

    #[test]
    fn a_cell_whose_last_round_is_unreported_is_not_shut_out_of_a_small_round() {
        // Seven cells have not reported the 17 starts of the last round as
        // running yet, three have; the seven are emptier. A small round of
        // ten follows (the last of a push).
        let mut cells: Vec<_> = (0..10)
            .map(|i| {
                let mut c = cell(&format!("c{i}"), "z", 8192);
                c.available.memory_mb = if i < 7 { 4096 } else { 3072 };
                c.starting = if i < 7 { 17 } else { 0 };
                c
            })
            .collect();
        let batch: Vec<_> = (0..10).map(|i| task(&format!("t{i}"), 128)).collect();
        let on_late = |cells: &mut Vec<CellView>| {
            let out = auction(&AuctionConfig::default(), cells, &batch);
            out.placed.iter().filter(|p| p.cell.as_str() < "c7").count()
        };
        // The slack is the median cell's 17 in flight: load decides, and
        // the emptier, late cells take the round.
        assert_eq!(on_late(&mut cells.clone()), 10);
        // A cell far above its peers is still charged: one cell with 30 in
        // flight while the nine others have 2 (the median) gets nothing,
        // though it is the emptiest.
        for (i, c) in cells.iter_mut().enumerate() {
            c.available.memory_mb = if i == 0 { 6144 } else { 3072 };
            c.starting = if i == 0 { 30 } else { 2 };
        }
        let out = auction(&AuctionConfig::default(), &mut cells, &batch);
        assert!(
            out.placed.iter().all(|p| p.cell.as_str() != "c0"),
            "{out:?}"
        );
    }

    #[test]
    fn a_cell_whose_reports_lag_rounds_behind_is_not_charged_within_the_pipeline() {
        // Three cells have not reported the 34 starts of the last two
        // rounds (170 items each over ten cells) as running yet; their
        // seven peers have reported everything. All are equally loaded.
        let cells: Vec<_> = (0..10)
            .map(|i| {
                let mut c = cell(&format!("c{i}"), "z", 8192);
                c.available.memory_mb = 4096;
                c.starting = if i < 3 { 34 } else { 0 };
                c
            })
            .collect();
        let batch: Vec<_> = (0..20).map(|i| task(&format!("t{i}"), 128)).collect();
        let on_late = |pipeline_items: u64| {
            let config = AuctionConfig {
                pipeline_items,
                ..AuctionConfig::default()
            };
            let out = auction(&config, &mut cells.clone(), &batch);
            out.placed.iter().filter(|p| p.cell.as_str() < "c3").count()
        };
        // Without the pipeline's slack they are charged 20 starts and get
        // nothing: they end a round's worth below their peers.
        assert_eq!(on_late(0), 0);
        // Within it, load decides: two each, as everyone.
        assert_eq!(on_late(340), 6);
        // The slack is the pipeline's even share (with the mean in flight),
        // no more: cells six rounds behind are charged.
        let mut deeper = cells.clone();
        for c in &mut deeper[..3] {
            c.starting = 102;
        }
        let config = AuctionConfig {
            pipeline_items: 340,
            ..AuctionConfig::default()
        };
        let out = auction(&config, &mut deeper, &batch);
        assert!(
            out.placed.iter().all(|p| p.cell.as_str() >= "c3"),
            "{out:?}"
        );
    }

    #[test]
    fn a_fresh_empty_cell_does_not_receive_a_whole_batch() {
        // Ten cells half full and one empty: without the starting weight,
        // the empty cell would take every start of the batch at once.
        let mut cells: Vec<_> = (0..10)
            .map(|i| {
                let mut c = cell(&format!("c{i}"), "z", 8192);
                c.available.memory_mb = 4096;
                c.available.containers = 50;
                c
            })
            .collect();
        cells.push(cell("fresh", "z", 8192));
        let batch: Vec<_> = (0..20).map(|i| task(&format!("t{i}"), 128)).collect();
        let on_fresh = |config: &AuctionConfig| {
            let out = auction(config, &mut cells.clone(), &batch);
            out.placed
                .iter()
                .filter(|p| p.cell.as_str() == "fresh")
                .count()
        };
        // Charged for every start, it takes at most two; spared its even
        // share and the round's again (⌈20 / 11⌉ + ⌈20 / 11⌉ = 4), at most
        // four.
        let every_start = AuctionConfig {
            round_share: false,
            ..AuctionConfig::default()
        };
        assert!(on_fresh(&every_start) <= 2);
        assert!(on_fresh(&AuctionConfig::default()) <= 4);
        // A pipeline of rounds in flight adds no slack when no cell has
        // anything in flight: the slack is never more than the busiest
        // cell's starts.
        let after_a_push = AuctionConfig {
            pipeline_items: 100_000,
            ..AuctionConfig::default()
        };
        assert!(on_fresh(&after_a_push) <= 4);
        let storm = AuctionConfig {
            starting_weight: 0.0,
            ..AuctionConfig::default()
        };
        assert_eq!(on_fresh(&storm), 20);
    }

    #[test]
    fn another_instance_of_the_app_outweighs_any_load() {
        let mut empty_with_app = cell("c1", "z", 4096);
        empty_with_app.app_instances.insert(key("web"), 1);
        let mut nearly_full = cell("c2", "z", 4096);
        nearly_full.available.memory_mb = 600;
        nearly_full.starting = 2;
        for config in both() {
            let mut cells = vec![empty_with_app.clone(), nearly_full.clone()];
            let out = auction(&config, &mut cells, &[lrp("web", 1, 512)]);
            assert_eq!(cell_of(&out, "web-1"), "c2");
            // Another app does not mind.
            let out = auction(&config, &mut cells, &[lrp("api", 0, 512)]);
            assert_eq!(cell_of(&out, "api-0"), "c1");
        }
    }

    #[test]
    fn tasks_neither_spread_by_zone_nor_count_as_app_instances() {
        let mut roomy = cell("a1", "za", 8192);
        roomy.app_instances.insert(key("job"), 5);
        let mut tight = cell("b1", "zb", 8192);
        tight.available.memory_mb = 1024;
        let mut cells = vec![roomy, tight];
        let out = auction(&AuctionConfig::default(), &mut cells, &[task("job", 512)]);
        assert_eq!(cell_of(&out, "job-0"), "a1");
        assert_eq!(
            cells[0].instances_of(&key("job")),
            5,
            "a task is not an LRP instance"
        );
        assert_eq!(cells[0].starting, 1);
    }

    #[test]
    fn placement_tags_rootfs_and_draining_filter_cells() {
        let mut gpu = cell("c1", "z", 1024);
        gpu.tags = tags(&["gpu", "ssd"]);
        gpu.rootfs = RootfsSupport::Only(["/stacks/jammy".to_owned()].into());
        let mut drained = cell("c2", "z", 65536);
        drained.tags = tags(&["gpu", "ssd"]);
        drained.draining = true;
        let plain = cell("c3", "z", 65536);
        let mut cells = vec![gpu, drained, plain];

        let mut wants_gpu = task("ml", 512);
        wants_gpu.tags = tags(&["gpu"]);
        wants_gpu.rootfs = "/stacks/jammy".into();
        let mut other_rootfs = wants_gpu.clone();
        other_rootfs.id = InstanceId::new("ml-other").unwrap();
        other_rootfs.rootfs = "/stacks/noble".into();
        let anything = task("web", 512);
        let out = auction(
            &AuctionConfig::default(),
            &mut cells,
            &[wants_gpu, other_rootfs, anything],
        );
        assert_eq!(cell_of(&out, "ml-0"), "c1");
        assert_eq!(
            error_of(&out, "ml-other"),
            "every matching cell is draining (1 cells)",
            "c1 lacks the rootfs; c2 has it (any) but drains"
        );
        assert_eq!(cell_of(&out, "web-0"), "c3", "the bigger, emptier cell");
    }

    #[test]
    fn errors_say_why_nothing_fits() {
        let config = AuctionConfig::default();
        let mut c1 = cell("cell-1", "z", 8192);
        c1.available = cap(128, 50_000, 10);
        let mut c2 = cell("cell-2", "z", 8192);
        c2.available = cap(256, 50_000, 10);
        let mut c3 = cell("cell-3", "z", 8192);
        c3.available = cap(256, 80, 10);
        let cells = vec![c1, c2, c3];
        let run = |cells: &[CellView], item: WorkItem| {
            let id = item.id.to_string();
            error_of(&auction(&config, &mut cells.to_vec(), &[item]), &id)
        };

        assert_eq!(
            run(&cells, task("big", 512)),
            "no cell has 512 MB free: largest free is 256 MB on cell-2"
        );
        let mut disky = task("disky", 200);
        disky.resources.disk_mb = 60_000;
        assert_eq!(
            run(&cells, disky),
            "no cell with 200 MB of memory free has 60000 MB of disk free: largest is 50000 MB on cell-2"
        );
        let mut gpu = task("gpu", 1);
        gpu.tags = tags(&["gpu"]);
        assert_eq!(run(&cells, gpu.clone()), "no cell has tags {gpu}");
        let mut some = cells.clone();
        some[0].tags = tags(&["gpu"]);
        some[1].tags = tags(&["ssd"]);
        gpu.tags = tags(&["gpu", "ssd"]);
        assert_eq!(
            run(&some, gpu.clone()),
            "no cell has all of the tags {gpu, ssd}"
        );
        gpu.tags = tags(&["gpu", "ssd", "fpga"]);
        assert_eq!(run(&some, gpu), "no cell has tags {fpga}");
        let mut stack = task("stack", 1);
        stack.rootfs = "/stacks/x".into();
        let mut only = cells.clone();
        for c in &mut only {
            c.rootfs = RootfsSupport::Only(["/stacks/y".to_owned()].into());
        }
        assert_eq!(
            run(&only, stack),
            "no cell with the required tags offers root filesystem \"/stacks/x\""
        );
        let mut drained = cells.clone();
        for c in &mut drained {
            c.draining = true;
        }
        assert_eq!(
            run(&drained, task("t", 1)),
            "every matching cell is draining (3 cells)"
        );
        let mut full = cells.clone();
        for c in &mut full {
            c.available.containers = 0;
        }
        assert_eq!(
            run(&full, task("t", 1)),
            "every matching cell has all its container slots in use (3 cells)"
        );
        assert_eq!(run(&[], task("t", 1)), "no cells are available");
    }

    #[test]
    fn an_error_accounts_for_earlier_placements_of_the_batch() {
        let mut cells = vec![cell("c1", "z", 1000), cell("c2", "z", 600)];
        let batch = vec![task("a", 700), task("b", 500), task("c", 450)];
        let out = auction(&AuctionConfig::default(), &mut cells, &batch);
        assert_eq!(cell_of(&out, "a-0"), "c1");
        assert_eq!(cell_of(&out, "b-0"), "c2");
        assert_eq!(
            error_of(&out, "c-0"),
            "no cell has 450 MB free: largest free is 300 MB on c1"
        );
        assert_eq!(out.unplaced[0].error.reason(), "memory");
    }

    #[test]
    fn the_same_app_name_in_two_tenants_is_two_apps() {
        let mut other = lrp("web", 1, 256);
        other.tenant = TenantId::new("globex").unwrap();
        other.id = InstanceId::new("globex-web-1").unwrap();
        let mut mine = cell("c1", "z", 8192);
        mine.app_instances.insert(key("web"), 1);
        let mut cells = vec![mine, cell("c2", "z", 2048)];
        // acme/web is on c1, so acme's next instance avoids it; globex's
        // does not care and takes the emptier c1.
        let out = auction(
            &AuctionConfig::default(),
            &mut cells,
            &[lrp("web", 1, 256), other],
        );
        assert_eq!(cell_of(&out, "web-1"), "c2");
        assert_eq!(cell_of(&out, "globex-web-1"), "c1");
    }

    // ---- property tests ----

    const APPS: [&str; 3] = ["a", "b", "c"];
    const TENANTS: [&str; 2] = ["t1", "t2"];
    const TAGS: [&str; 2] = ["gpu", "ssd"];

    fn tag_set() -> impl Strategy<Value = BTreeSet<Tag>> {
        proptest::collection::btree_set(proptest::sample::select(TAGS.to_vec()), 0..=2)
            .prop_map(|s| s.into_iter().map(tag).collect())
    }

    fn arb_cell() -> impl Strategy<Value = CellView> {
        (
            (
                proptest::sample::select(vec!["z1", "z2", "z3"]),
                tag_set(),
                proptest::bool::weighted(0.7),
            ),
            (0u64..6000, 0u64..6000, 0u64..12),
            (0u64..=100, 0u64..=100, 0u64..=100),
            proptest::collection::vec((0usize..6, 0u32..3), 0..4),
            0u32..4,
            proptest::bool::weighted(0.2),
        )
            .prop_map(
                |((zone, tags, any_rootfs), (m, d, n), (fm, fd, fc), apps, starting, draining)| {
                    let total = cap(m, d, n);
                    let mut c = CellView::new(
                        CellId::new("placeholder").unwrap(),
                        Zone::new(zone).unwrap(),
                        total,
                    );
                    c.available = cap(m * fm / 100, d * fd / 100, n * fc / 100);
                    c.tags = tags;
                    if !any_rootfs {
                        c.rootfs = RootfsSupport::Only(["/r1".to_owned()].into());
                    }
                    for (app, count) in apps {
                        let key = AppKey {
                            tenant: TenantId::new(TENANTS[app % 2]).unwrap(),
                            name: AppId::new(APPS[app % 3]).unwrap(),
                        };
                        c.app_instances.insert(key, count);
                    }
                    c.starting = starting;
                    c.draining = draining;
                    c
                },
            )
    }

    fn arb_cells() -> impl Strategy<Value = Vec<CellView>> {
        proptest::collection::vec(arb_cell(), 0..8).prop_map(|mut cells| {
            // Unique ids, in an order unrelated to the position.
            let n = cells.len();
            for (i, c) in cells.iter_mut().enumerate() {
                c.id = CellId::new(format!("c{}", n - i)).unwrap();
            }
            cells
        })
    }

    fn arb_item() -> impl Strategy<Value = WorkItem> {
        (
            (0usize..6, 0u32..5, proptest::bool::weighted(0.3)),
            (1u64..1500, 1u64..1500),
            // Mostly untagged and on the common rootfs, so that most items
            // fit somewhere and placements interact.
            prop_oneof![3 => Just(BTreeSet::new()), 1 => tag_set()],
            proptest::sample::select(vec!["/r1", "/r1", "/r1", "/r2"]),
        )
            .prop_map(|((app, index, is_task), (m, d), tags, rootfs)| WorkItem {
                id: InstanceId::new("placeholder").unwrap(),
                tenant: TenantId::new(TENANTS[app % 2]).unwrap(),
                app: AppId::new(APPS[app % 3]).unwrap(),
                index,
                kind: if is_task {
                    InstanceKind::Task
                } else {
                    InstanceKind::Lrp
                },
                resources: Resources {
                    memory_mb: m,
                    disk_mb: d,
                    cpu_weight: 100,
                    max_pids: 100,
                },
                rootfs: rootfs.into(),
                tags,
            })
    }

    fn arb_batch() -> impl Strategy<Value = Vec<WorkItem>> {
        proptest::collection::vec(arb_item(), 0..25).prop_map(|mut items| {
            for (i, w) in items.iter_mut().enumerate() {
                w.id = InstanceId::new(format!("i{i}")).unwrap();
            }
            items
        })
    }

    fn arb_config() -> impl Strategy<Value = AuctionConfig> {
        (any::<bool>(), 0u8..3, 0u8..3, any::<bool>(), 0u8..3, 0u8..3).prop_map(
            |(diego, sw, ap, share, mw, pipe)| AuctionConfig {
                scoring: if diego {
                    Scoring::Mean
                } else {
                    Scoring::Balanced
                },
                starting_weight: [0.0, 0.25, 2.0][sw as usize],
                app_penalty: [0.0, 1000.0, 0.1][ap as usize],
                round_share: share,
                memory_weight: [1.0, 3.0, 0.0][mw as usize],
                pipeline_items: [0, 7, 40][pipe as usize],
            },
        )
    }

    fn no_persistence() -> ProptestConfig {
        ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(no_persistence())]

        #[test]
        fn the_fast_auction_places_exactly_as_diegos_loop(
            config in arb_config(), cells in arb_cells(), batch in arb_batch()
        ) {
            let mut fast_cells = cells.clone();
            let mut slow_cells = cells;
            let fast = run_auction(&config, &mut fast_cells, &batch);
            let slow = reference::run_auction(&config, &mut slow_cells, &batch);
            prop_assert_eq!(fast, slow);
            prop_assert_eq!(fast_cells, slow_cells);
        }

        #[test]
        fn placements_respect_filters_and_capacity_and_failures_are_true(
            config in arb_config(), cells in arb_cells(), batch in arb_batch()
        ) {
            let before = cells.clone();
            let mut after = cells;
            let out = run_auction(&config, &mut after, &batch);
            prop_assert_eq!(out.placed.len() + out.unplaced.len(), batch.len());
            let by_id: BTreeMap<&InstanceId, &WorkItem> = batch.iter().map(|w| (&w.id, w)).collect();
            let mut taken: BTreeMap<&CellId, (u64, u64, u64)> = BTreeMap::new();
            for p in &out.placed {
                let item = by_id[&p.id];
                let cell = before.iter().find(|c| c.id == p.cell).unwrap();
                prop_assert!(!cell.draining);
                prop_assert!(cell.matches(item));
                let t = taken.entry(&cell.id).or_default();
                t.0 += item.resources.memory_mb;
                t.1 += item.resources.disk_mb;
                t.2 += 1;
            }
            for (b, a) in before.iter().zip(&after) {
                let (m, d, n) = taken.get(&b.id).copied().unwrap_or_default();
                prop_assert!(m <= b.available.memory_mb && d <= b.available.disk_mb && n <= b.available.containers,
                    "{} overcommitted", b.id);
                prop_assert_eq!(a.available, cap(b.available.memory_mb - m, b.available.disk_mb - d, b.available.containers - n));
                prop_assert_eq!(u64::from(a.starting), u64::from(b.starting) + n);
            }
            // Capacity only shrinks during an auction, so an item that fit
            // nowhere when it was tried fits nowhere at the end either.
            for u in &out.unplaced {
                let item = by_id[&u.id];
                let fits = after.iter().any(|c| !c.draining && c.matches(item) && Request::of(item).fits(c.available));
                prop_assert!(!fits, "{} was refused ({}) but fits", u.id, u.error);
            }
        }

        #[test]
        fn the_order_of_the_cells_does_not_matter(
            config in arb_config(), cells in arb_cells(), batch in arb_batch(), rot in 0usize..8
        ) {
            let mut a = cells.clone();
            let mut b = cells;
            b.reverse();
            if !b.is_empty() {
                let k = rot % b.len();
                b.rotate_left(k);
            }
            prop_assert_eq!(run_auction(&config, &mut a, &batch), run_auction(&config, &mut b, &batch));
        }

        #[test]
        fn with_room_everywhere_every_app_is_level_across_zones_and_cells(
            zones in proptest::collection::vec(1usize..4, 1..4),
            apps in proptest::collection::vec(1u32..20, 1..4),
            config in arb_config(),
        ) {
            let config = AuctionConfig { app_penalty: 1000.0, ..config };
            let mut cells = Vec::new();
            for (z, n) in zones.iter().enumerate() {
                for i in 0..*n {
                    cells.push(cell(&format!("z{z}-c{i}"), &format!("z{z}"), 1 << 30));
                }
            }
            let batch: Vec<WorkItem> = apps
                .iter()
                .enumerate()
                .flat_map(|(a, n)| (0..*n).map(move |i| lrp(&format!("app{a}"), i, 64 + 64 * u64::from(i % 3))))
                .collect();
            let out = run_auction(&config, &mut cells, &batch);
            prop_assert!(out.unplaced.is_empty());
            for a in 0..apps.len() {
                let k = key(&format!("app{a}"));
                let mut per_zone: BTreeMap<&Zone, Vec<u32>> = BTreeMap::new();
                for c in &cells {
                    per_zone.entry(&c.zone).or_default().push(c.instances_of(&k));
                }
                let zone_sums: Vec<u32> = per_zone.values().map(|v| v.iter().sum()).collect();
                let spread = zone_sums.iter().max().unwrap() - zone_sums.iter().min().unwrap();
                prop_assert!(spread <= 1, "app{a} zones {zone_sums:?}");
                for counts in per_zone.values() {
                    let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
                    prop_assert!(spread <= 1, "app{a} cells {counts:?}");
                }
            }
        }
    }
}
