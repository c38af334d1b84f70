//! `cargo xtask bench auction`, first part: the brain's **in-process auction
//! core** ([`corral_brain::auction`]) placing 100,000 instances on 1,000
//! simulated cells held in memory. No QUIC, no cells answering bids, no
//! store: this measures the placement algorithm alone, the floor under the
//! end-to-end benchmark over QUIC (`bench auction --quic`, in
//! [`crate::bench_cluster`]).
//!
//! It reports, for the default auction, Diego's scoring, and Diego's loop as
//! transcribed in `auction::reference`: placements per second, batch latency
//! p50/p99, and the utilisation spread (max − min used fraction across
//! cells, for memory, disk and container slots) at the first batch boundary
//! where half the cluster's memory is placed. It also checks that the fast
//! implementation places exactly as the reference does. It reports numbers;
//! it asserts nothing about them.
//!
//! The workload (fixed seed, so runs compare):
//! - cells: identical, 80 GiB memory, 320 GiB disk, 250 containers (Diego's
//!   default maximum), spread round-robin over 3 zones;
//! - apps: 60 % have 1–3 instances, 30 % 4–20, 10 % 21–100; memory per
//!   instance 128 MB–4 GB (mostly small), disk 256 MB–4 GB drawn
//!   independently of memory; an app's instances arrive together;
//! - batches of 1,000 starts; between batches every start is taken to have
//!   completed (the cells' `starting` counts go back to zero), as the cells'
//!   state reports would say.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use corral_brain::auction::{self, AuctionConfig, AuctionOutcome, CellView, Scoring};
use corral_proto::wire::{WorkItem, Zone};
use corral_proto::{AppId, Capacity, CellId, InstanceId, InstanceKind, Resources, TenantId};

pub(crate) const ZONES: usize = 3;
pub(crate) const CELL: Capacity = Capacity {
    memory_mb: 80 * 1024,
    disk_mb: 320 * 1024,
    containers: 250,
};

#[derive(Debug, Clone)]
struct Options {
    cells: usize,
    instances: usize,
    batch: usize,
    seed: u64,
    /// Also run Diego's loop (slow: every item scans every cell's maps).
    reference: bool,
    /// Overrides of the default auction's weights, to explore them.
    starting_weight: Option<f64>,
    app_penalty: Option<f64>,
    memory_weight: Option<f64>,
    round_share: bool,
    /// Print the spread after every batch.
    trace: bool,
    /// The end-to-end benchmark's memory sizes (`bench auction --quic`):
    /// scaled so that all the instances ask for half the cells' memory.
    half: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cells: 1000,
            instances: 100_000,
            batch: 1000,
            seed: 0x00c0_77a1,
            reference: true,
            starting_weight: None,
            app_penalty: None,
            memory_weight: None,
            round_share: true,
            half: false,
            trace: false,
        }
    }
}

fn parse(args: &[String]) -> Result<Options> {
    fn value<T: std::str::FromStr>(name: &str, v: Option<&String>) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let v = v.with_context(|| format!("{name} needs a value"))?;
        v.parse()
            .with_context(|| format!("{name} {v:?} is not a valid number"))
    }
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let name = arg.as_str();
        match name {
            "--cells" => o.cells = value(name, it.next())?,
            "--instances" => o.instances = value(name, it.next())?,
            "--batch" => o.batch = value(name, it.next())?,
            "--seed" => o.seed = value(name, it.next())?,
            "--starting-weight" => o.starting_weight = Some(value(name, it.next())?),
            "--app-penalty" => o.app_penalty = Some(value(name, it.next())?),
            "--memory-weight" => o.memory_weight = Some(value(name, it.next())?),
            "--no-round-share" => o.round_share = false,
            "--half" => o.half = true,
            "--trace" => o.trace = true,
            "--no-reference" => o.reference = false,
            other => bail!(
                "unknown argument {other:?}; expected --cells N, --instances N, --batch N, --seed N, \
                 --starting-weight X, --app-penalty X, --memory-weight X, --no-round-share, --half, --trace, \
                 --no-reference"
            ),
        }
    }
    if o.cells == 0 || o.batch == 0 {
        bail!("--cells and --batch must be at least 1");
    }
    Ok(o)
}

/// SplitMix64: small, fast, good enough for a workload, and seeded.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// Picks from `(weight, value)` pairs.
    pub(crate) fn weighted(&mut self, table: &[(u64, u64)]) -> u64 {
        let total: u64 = table.iter().map(|(w, _)| w).sum();
        let mut x = self.next() % total;
        for (w, v) in table {
            if x < *w {
                return *v;
            }
            x -= w;
        }
        table.last().map_or(0, |(_, v)| *v)
    }
}

fn cells(n: usize) -> Result<Vec<CellView>> {
    (0..n)
        .map(|i| {
            Ok(CellView::new(
                CellId::new(format!("cell-{i:05}"))?,
                Zone::new(format!("zone-{}", i % ZONES))?,
                CELL,
            ))
        })
        .collect()
}

fn workload(o: &Options) -> Result<Vec<WorkItem>> {
    let mut rng = Rng(o.seed);
    let half_scale = crate::bench_cluster::half_memory_scale(o.cells, o.instances);
    let tenant = TenantId::new("bench")?;
    let mut items = Vec::with_capacity(o.instances);
    let mut app_no = 0u64;
    while items.len() < o.instances {
        let count = match rng.range(0, 99) {
            0..=59 => rng.range(1, 3),
            60..=89 => rng.range(4, 20),
            _ => rng.range(21, 100),
        };
        let memory_mb = if o.half {
            crate::bench_cluster::draw_memory_mb(&mut rng, half_scale)
        } else {
            rng.weighted(&[
                (20, 128),
                (25, 256),
                (25, 512),
                (18, 1024),
                (9, 2048),
                (3, 4096),
            ])
        };
        let disk_mb = rng.weighted(&[(30, 256), (30, 512), (25, 1024), (10, 2048), (5, 4096)]);
        let app = AppId::new(format!("app-{app_no:06}"))?;
        for index in 0..count {
            if items.len() == o.instances {
                break;
            }
            let index = u32::try_from(index)?;
            items.push(WorkItem {
                id: InstanceId::new(format!("{app}-{index}"))?,
                tenant: tenant.clone(),
                app: app.clone(),
                index,
                kind: InstanceKind::Lrp,
                resources: Resources {
                    memory_mb,
                    disk_mb,
                    cpu_weight: 100,
                    max_pids: 1024,
                },
                rootfs: "/var/lib/corral/rootfs/base".into(),
                tags: Default::default(),
            });
        }
        app_no += 1;
    }
    Ok(items)
}

/// max − min used fraction across cells, per dimension.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Spread {
    pub(crate) memory: f64,
    pub(crate) disk: f64,
    pub(crate) containers: f64,
    /// Mean used memory fraction when measured.
    pub(crate) mean_memory: f64,
}

fn frac(used: u64, total: u64) -> f64 {
    used.min(total) as f64 / total.max(1) as f64
}

/// A cell's total and available capacity.
type Caps = (Capacity, Capacity);

/// The spread of cells given as `(total, available)` capacities.
pub(crate) fn spread_of(cells: &[Caps]) -> Spread {
    let dims: [fn(&Caps) -> f64; 3] = [
        |(t, a)| frac(t.memory_mb.saturating_sub(a.memory_mb), t.memory_mb),
        |(t, a)| frac(t.disk_mb.saturating_sub(a.disk_mb), t.disk_mb),
        |(t, a)| frac(t.containers.saturating_sub(a.containers), t.containers),
    ];
    let range = |f: fn(&Caps) -> f64| {
        let (lo, hi) = cells
            .iter()
            .map(f)
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
        if cells.is_empty() {
            0.0
        } else {
            hi - lo
        }
    };
    Spread {
        memory: range(dims[0]),
        disk: range(dims[1]),
        containers: range(dims[2]),
        mean_memory: cells.iter().map(dims[0]).sum::<f64>() / cells.len().max(1) as f64,
    }
}

fn spread(cells: &[CellView]) -> Spread {
    let caps: Vec<(Capacity, Capacity)> = cells.iter().map(|c| (c.total, c.available)).collect();
    spread_of(&caps)
}

type AuctionFn = fn(&AuctionConfig, &mut [CellView], &[WorkItem]) -> AuctionOutcome;

struct Run {
    name: &'static str,
    placed: usize,
    unplaced: BTreeMap<&'static str, usize>,
    elapsed: Duration,
    batches: Vec<Duration>,
    at_half: Option<Spread>,
    at_end: Spread,
    placements: Vec<(InstanceId, CellId)>,
}

fn run_one(
    name: &'static str,
    f: AuctionFn,
    config: &AuctionConfig,
    o: &Options,
    items: &[WorkItem],
) -> Result<Run> {
    let mut view = cells(o.cells)?;
    let capacity = CELL.memory_mb as f64 * o.cells as f64;
    let mut placed_mb = 0f64;
    let mut run = Run {
        name,
        placed: 0,
        unplaced: BTreeMap::new(),
        elapsed: Duration::ZERO,
        batches: Vec::new(),
        at_half: None,
        at_end: Spread::default(),
        placements: Vec::with_capacity(items.len()),
    };
    let memory_of: BTreeMap<&InstanceId, u64> = items
        .iter()
        .map(|w| (&w.id, w.resources.memory_mb))
        .collect();
    for batch in items.chunks(o.batch) {
        let started = Instant::now();
        let out = f(config, &mut view, batch);
        let took = started.elapsed();
        run.elapsed += took;
        run.batches.push(took);
        run.placed += out.placed.len();
        for p in out.placed {
            placed_mb += memory_of.get(&p.id).copied().unwrap_or(0) as f64;
            run.placements.push((p.id, p.cell));
        }
        for u in out.unplaced {
            *run.unplaced.entry(u.error.reason()).or_default() += 1;
        }
        for c in &mut view {
            c.starting = 0;
        }
        if o.trace {
            let s = spread(&view);
            eprintln!(
                "{name}: batch {} ({} items): spread mem {:.1} % / disk {:.1} % / slots {:.1} %",
                run.batches.len(),
                batch.len(),
                s.memory * 100.0,
                s.disk * 100.0,
                s.containers * 100.0
            );
        }
        if run.at_half.is_none() && placed_mb >= capacity / 2.0 {
            run.at_half = Some(spread(&view));
        }
    }
    run.at_end = spread(&view);
    Ok(run)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn report(o: &Options, runs: &[Run]) -> String {
    let mut s = format!(
        "### auction core, in process ({} cells, {} instances, batches of {}, seed {:#x})\n\n\
         | auction | placed | unplaced | placements/s | batch p50 | batch p99 | spread at ½ memory (mem / disk / slots) | spread at end (mem) |\n\
         |---|---|---|---|---|---|---|---|\n",
        o.cells, o.instances, o.batch, o.seed
    );
    for r in runs {
        let mut sorted = r.batches.clone();
        sorted.sort();
        let per_sec = r.placed as f64 / r.elapsed.as_secs_f64().max(1e-9);
        let unplaced: Vec<String> = r.unplaced.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let half = r.at_half.map_or("not reached".to_owned(), |h| {
            format!(
                "{:.1} % / {:.1} % / {:.1} % (mean memory {:.0} %)",
                h.memory * 100.0,
                h.disk * 100.0,
                h.containers * 100.0,
                h.mean_memory * 100.0
            )
        });
        s += &format!(
            "| {} | {} | {} | {:.0} | {:.2} ms | {:.2} ms | {} | {:.1} % (mean {:.0} %) |\n",
            r.name,
            r.placed,
            if unplaced.is_empty() {
                "0".to_owned()
            } else {
                unplaced.join(", ")
            },
            per_sec,
            percentile(&sorted, 50.0).as_secs_f64() * 1e3,
            percentile(&sorted, 99.0).as_secs_f64() * 1e3,
            half,
            r.at_end.memory * 100.0,
            r.at_end.mean_memory * 100.0,
        );
    }
    if let Some(kib) = vm_hwm_kib() {
        s += &format!("\npeak RSS of the benchmark process: {} MiB\n", kib / 1024);
    }
    s
}

/// Runs the in-process auction benchmark. `args` are what follows
/// `bench auction` on the command line.
pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    if cfg!(debug_assertions) {
        eprintln!("note: built without optimisations; run `cargo xtask` from a --release build for real numbers");
    }
    let items = workload(&o)?;
    let defaults = AuctionConfig::default();
    let balanced = AuctionConfig {
        starting_weight: o.starting_weight.unwrap_or(defaults.starting_weight),
        app_penalty: o.app_penalty.unwrap_or(defaults.app_penalty),
        memory_weight: o.memory_weight.unwrap_or(defaults.memory_weight),
        round_share: o.round_share,
        ..defaults
    };
    let diego = AuctionConfig::diego();
    debug_assert_eq!(diego.scoring, Scoring::Mean);
    let mut runs = vec![
        run_one(
            "corral (balanced scoring)",
            auction::run_auction,
            &balanced,
            &o,
            &items,
        )?,
        run_one(
            "corral, Diego's scoring",
            auction::run_auction,
            &diego,
            &o,
            &items,
        )?,
    ];
    if o.reference {
        let reference = run_one(
            "Diego's loop (reference)",
            auction::reference::run_auction,
            &diego,
            &o,
            &items,
        )?;
        if reference.placements != runs[1].placements {
            bail!("the fast auction placed differently from the reference: a bug");
        }
        runs.push(reference);
    }
    println!("{}", report(&o, &runs));
    Ok(())
}
