//! The brain's Prometheus metrics, served on the management API's
//! `/metrics` (no token needed, like `/healthz`). Labels are bounded: cell
//! states, message types, action names and failure reasons are fixed sets.

use crate::api::{ActualSnapshot, CellState};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MessageLabels {
    direction: &'static str,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

/// Every metric family of the brain.
pub struct BrainMetrics {
    registry: Registry,
    cells: Family<StateLabel, Gauge>,
    messages: Family<MessageLabels, Counter>,
    auctions: Counter,
    auction_duration: Histogram,
    loop_pass_duration: Histogram,
    input_wait: Histogram,
    placements: Counter,
    placement_failures: Family<ReasonLabel, Counter>,
    desired: Gauge,
    running: Gauge,
    convergence_runs: Counter,
    convergence_actions: Family<ActionLabel, Counter>,
    crashes: Counter,
    lost: Counter,
    services: Gauge,
    service_backends: Gauge,
    vips_free: Gauge,
}

impl std::fmt::Debug for BrainMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrainMetrics").finish_non_exhaustive()
    }
}

impl Default for BrainMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl BrainMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("corral_brain");
        let cells = Family::<StateLabel, Gauge>::default();
        registry.register(
            "cells",
            "Cells known to the brain, by state (connected, draining, lost)",
            cells.clone(),
        );
        let messages = Family::<MessageLabels, Counter>::default();
        registry.register(
            "messages",
            "Protocol messages exchanged with cells, by direction and type",
            messages.clone(),
        );
        let auctions = Counter::default();
        registry.register("auctions", "Auction rounds completed", auctions.clone());
        let auction_duration = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
        registry.register_with_unit(
            "auction_duration",
            "Time from an auction round's start to its last bid",
            prometheus_client::registry::Unit::Seconds,
            auction_duration.clone(),
        );
        let loop_pass_duration =
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
        registry.register_with_unit(
            "loop_pass_duration",
            "Time one pass of the brain's loop takes (a batch of inputs applied, convergence, an auction round placed); inputs arriving meanwhile wait",
            prometheus_client::registry::Unit::Seconds,
            loop_pass_duration.clone(),
        );
        let input_wait = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
        registry.register_with_unit(
            "input_wait",
            "Time a cell's message waits between its connection reading it and the loop applying it",
            prometheus_client::registry::Unit::Seconds,
            input_wait.clone(),
        );
        let placements = Counter::default();
        registry.register(
            "placements",
            "Instances placed on a cell (recorded and sent to start)",
            placements.clone(),
        );
        let placement_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "placement_failures",
            "Instances that fit on no cell in an auction, by reason",
            placement_failures.clone(),
        );
        let desired = Gauge::default();
        registry.register(
            "instances_desired",
            "Long-running instances the apps ask for",
            desired.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "instances_running",
            "Long-running instances that cells report running",
            running.clone(),
        );
        let convergence_runs = Counter::default();
        registry.register(
            "convergence_runs",
            "Convergence passes (after events and on the periodic sweep)",
            convergence_runs.clone(),
        );
        let convergence_actions = Family::<ActionLabel, Counter>::default();
        registry.register(
            "convergence_actions",
            "Actions decided by convergence, by kind",
            convergence_actions.clone(),
        );
        let crashes = Counter::default();
        registry.register(
            "instance_crashes",
            "Crashes of long-running instances counted against their slot",
            crashes.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "instances_lost",
            "Long-running instances their cell lost (start interrupted by an agent restart, shim died, node restarted), restarted without counting a crash",
            lost.clone(),
        );
        let services = Gauge::default();
        registry.register(
            "services",
            "Services (apps with a VIP and ports) told to the cells",
            services.clone(),
        );
        let service_backends = Gauge::default();
        registry.register(
            "service_backends",
            "Ready instances listed as backends, summed over every service",
            service_backends.clone(),
        );
        let vips_free = Gauge::default();
        registry.register(
            "vips_free",
            "Addresses of [network] vip_range no app holds (0 without a range)",
            vips_free.clone(),
        );
        Self {
            registry,
            cells,
            messages,
            auctions,
            auction_duration,
            loop_pass_duration,
            input_wait,
            placements,
            placement_failures,
            desired,
            running,
            convergence_runs,
            convergence_actions,
            crashes,
            lost,
            services,
            service_backends,
            vips_free,
        }
    }

    pub fn message(&self, direction: &'static str, r#type: &'static str) {
        self.messages
            .get_or_create(&MessageLabels { direction, r#type })
            .inc();
    }

    pub fn auction_done(&self, seconds: f64) {
        self.auctions.inc();
        self.auction_duration.observe(seconds);
    }

    pub fn loop_pass(&self, seconds: f64) {
        self.loop_pass_duration.observe(seconds);
    }

    pub fn input_waited(&self, seconds: f64) {
        self.input_wait.observe(seconds);
    }

    pub fn placed(&self, n: usize) {
        self.placements.inc_by(n as u64);
    }

    pub fn placement_failure(&self, reason: &'static str) {
        self.placement_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn convergence_run(&self) {
        self.convergence_runs.inc();
    }

    pub fn convergence_action(&self, action: &'static str) {
        self.convergence_actions
            .get_or_create(&ActionLabel { action })
            .inc();
    }

    pub fn crash(&self) {
        self.crashes.inc();
    }

    pub fn lost(&self) {
        self.lost.inc();
    }

    pub fn observe_cluster(&self, view: &ActualSnapshot, desired: u64, running: u64) {
        for (state, label) in [
            (CellState::Connected, "connected"),
            (CellState::Draining, "draining"),
            (CellState::Lost, "lost"),
        ] {
            let n = view.cells.iter().filter(|c| c.state == state).count();
            self.cells
                .get_or_create(&StateLabel { state: label })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.desired.set(i64::try_from(desired).unwrap_or(i64::MAX));
        self.running.set(i64::try_from(running).unwrap_or(i64::MAX));
    }

    pub fn observe_services(&self, services: u64, backends: u64, vips_free: u64) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.services.set(g(services));
        self.service_backends.set(g(backends));
        self.vips_free.set(g(vips_free));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
