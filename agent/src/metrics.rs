//! `/metrics`: the agent's Prometheus metrics. Event metrics (start latency,
//! instance ends) are recorded as they happen; per-instance usage and cell
//! capacity are read at scrape time by [`CellCollector`].

use crate::executor::Executor;
use corral_proto::{InstanceInfo, InstanceState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Weak};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    pub kind: String,
    pub state: String,
}

/// Labels of `corral_brain_messages_total`: both bounded (two directions,
/// the fixed set of `Message::name()`s).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrainMessageLabels {
    /// `sent` or `received`.
    pub direction: &'static str,
    /// The message's `Message::name()`.
    pub r#type: &'static str,
}

pub struct Metrics {
    pub start_latency: Histogram,
    pub instance_ends: Family<EndLabels, Counter>,
    pub oom_kills: Counter,
    /// 1 while a brain session is established (after its `HelloAck`).
    pub brain_connected: Gauge,
    /// Brain sessions established.
    pub brain_connects: Counter,
    pub brain_messages: Family<BrainMessageLabels, Counter>,
    /// Services from the brain that the load balancer refused.
    pub lb_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            // 5 ms .. ~20 s
            start_latency: Histogram::new(exponential_buckets(0.005, 2.0, 13)),
            instance_ends: Family::default(),
            oom_kills: Counter::default(),
            brain_connected: Gauge::default(),
            brain_connects: Counter::default(),
            brain_messages: Family::default(),
            lb_refused: Counter::default(),
        }
    }

    /// Counts a message to or from the brain.
    pub fn count_brain_message(&self, sent: bool, msg: &corral_proto::wire::Message) {
        self.brain_messages
            .get_or_create(&BrainMessageLabels {
                direction: if sent { "sent" } else { "received" },
                r#type: msg.name(),
            })
            .inc();
    }

    pub fn services_refused(&self, n: u64) {
        self.lb_refused.inc_by(n);
    }

    pub fn count_end(&self, info: &InstanceInfo) {
        let kind = match info.kind {
            corral_proto::InstanceKind::Lrp => "lrp",
            corral_proto::InstanceKind::Task => "task",
        };
        self.instance_ends
            .get_or_create(&EndLabels {
                kind: kind.into(),
                state: info.state.as_str().into(),
            })
            .inc();
        if info.oom_killed {
            self.oom_kills.inc();
        }
    }

    /// Builds the registry: the event metrics plus a collector reading the
    /// executor at scrape time.
    pub fn registry(self: &Arc<Self>, exec: Weak<Executor>) -> Registry {
        let mut r = Registry::with_prefix("corral");
        r.register(
            "instance_start_duration_seconds",
            "Time from an instance start request to its process running",
            self.start_latency.clone(),
        );
        r.register(
            "instance_ends",
            "Instances that ended, by kind and final state (exited or crashed)",
            self.instance_ends.clone(),
        );
        r.register(
            "oom_kills",
            "Instances ended by the out-of-memory killer",
            self.oom_kills.clone(),
        );
        r.register(
            "brain_connected",
            "1 while a session with the brain is established, else 0",
            self.brain_connected.clone(),
        );
        r.register(
            "brain_connects",
            "Sessions with the brain established (hello answered)",
            self.brain_connects.clone(),
        );
        r.register(
            "brain_messages",
            "Messages exchanged with the brain, by direction (sent, received) and type",
            self.brain_messages.clone(),
        );
        r.register(
            "lb_services_refused",
            "Services from the brain the load balancer could not program (a limit reached, an invalid service)",
            self.lb_refused.clone(),
        );
        r.register_collector(Box::new(CellCollector { exec }));
        r
    }
}

#[derive(Debug)]
struct CellCollector {
    exec: Weak<Executor>,
}

type Labels = Vec<(&'static str, String)>;

fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut me = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, m) in rows {
        m.encode(me.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for CellCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(exec) = self.exec.upgrade() else {
            return Ok(());
        };
        let total = exec.total();
        let avail = exec.available();
        const MB: i64 = 1 << 20;
        let cap = |v: u64| ConstGauge::new(v as i64);
        family(
            &mut enc,
            "cell_memory_capacity_bytes",
            "Memory this cell offers to instances",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(total.memory_mb as i64 * MB))],
        )?;
        family(
            &mut enc,
            "cell_memory_available_bytes",
            "Memory not reserved by instances",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(avail.memory_mb as i64 * MB))],
        )?;
        family(
            &mut enc,
            "cell_disk_capacity_bytes",
            "Disk this cell offers to instances",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(total.disk_mb as i64 * MB))],
        )?;
        family(
            &mut enc,
            "cell_disk_available_bytes",
            "Disk not reserved by instances",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(avail.disk_mb as i64 * MB))],
        )?;
        family(
            &mut enc,
            "cell_containers_capacity",
            "Containers this cell can run",
            MetricType::Gauge,
            [(vec![], cap(total.containers))],
        )?;
        family(
            &mut enc,
            "cell_containers_available",
            "Container slots not in use",
            MetricType::Gauge,
            [(vec![], cap(avail.containers))],
        )?;
        family(
            &mut enc,
            "cell_evacuating",
            "1 while the cell is evacuating (draining): it takes no new work",
            MetricType::Gauge,
            [(vec![], cap(u64::from(exec.evacuating().is_some())))],
        )?;

        let snaps = exec.snapshot();
        let by_state = InstanceState::ALL.map(|st| {
            let n = snaps.iter().filter(|s| s.info.state == st).count();
            (
                vec![("state", st.as_str().to_owned())],
                ConstGauge::new(n as i64),
            )
        });
        family(
            &mut enc,
            "instances",
            "Instances on this cell by state",
            MetricType::Gauge,
            by_state,
        )?;

        // Usage of instances that hold a container, read from their cgroups.
        let live: Vec<_> = snaps
            .iter()
            .filter(|s| !s.info.state.is_final())
            .map(|s| {
                let labels: Labels = vec![
                    ("instance", s.info.id.to_string()),
                    ("tenant", s.info.tenant.to_string()),
                    ("app", s.info.app.to_string()),
                ];
                let mut usage = crate::cgroups::read_v1(&s.paths);
                usage.disk_bytes = crate::layer::usage(&s.paths);
                (labels, usage, s.info.resources.memory_mb)
            })
            .collect();
        family(
            &mut enc,
            "instance_cpu_seconds",
            "CPU time used by an instance",
            MetricType::Counter,
            live.iter().filter_map(|(l, u, _)| {
                u.cpu_ns
                    .map(|c| (l.clone(), ConstCounter::new(c as f64 / 1e9)))
            }),
        )?;
        family(
            &mut enc,
            "instance_memory_bytes",
            "Memory used by an instance (page cache included)",
            MetricType::Gauge,
            live.iter().filter_map(|(l, u, _)| {
                u.memory_bytes
                    .map(|m| (l.clone(), ConstGauge::new(m as i64)))
            }),
        )?;
        family(
            &mut enc,
            "instance_memory_limit_bytes",
            "Memory limit of an instance",
            MetricType::Gauge,
            live.iter()
                .map(|(l, _, mb)| (l.clone(), ConstGauge::new(*mb as i64 * MB))),
        )?;
        family(
            &mut enc,
            "instance_oom_kills",
            "Processes of an instance killed by the OOM killer",
            MetricType::Counter,
            live.iter()
                .filter_map(|(l, u, _)| u.oom_kills.map(|n| (l.clone(), ConstCounter::new(n)))),
        )?;
        network(&mut enc, &exec, &snaps)?;
        if let Some(lb) = exec.lb() {
            if let Some(counters) = lb.north_south_counters() {
                family(
                    &mut enc,
                    "north_south_packets",
                    "Packets to published ports seen by the uplinks' balancer, by verdict",
                    MetricType::Counter,
                    counters.iter().map(|(v, p, _)| {
                        (vec![("verdict", (*v).to_owned())], ConstCounter::new(*p))
                    }),
                )?;
            }
            let (services, backends) = lb.counts();
            family(
                &mut enc,
                "lb_services",
                "Service ports (VIP, port, protocol) programmed in the load balancer",
                MetricType::Gauge,
                [(Labels::new(), ConstGauge::new(services as i64))],
            )?;
            family(
                &mut enc,
                "lb_backends",
                "Backend addresses (instance, port) programmed in the load balancer",
                MetricType::Gauge,
                [(Labels::new(), ConstGauge::new(backends as i64))],
            )?;
        }
        family(
            &mut enc,
            "instance_disk_used_bytes",
            "Bytes used on an instance's own disk (its writable layer)",
            MetricType::Gauge,
            live.iter().filter_map(|(l, u, _)| {
                u.disk_bytes.map(|n| (l.clone(), ConstGauge::new(n as i64)))
            }),
        )?;
        family(
            &mut enc,
            "instance_pids",
            "Processes and threads in an instance",
            MetricType::Gauge,
            live.iter()
                .filter_map(|(l, u, _)| u.pids.map(|n| (l.clone(), ConstGauge::new(n as i64)))),
        )?;
        Ok(())
    }
}

fn direction(d: corral_ebpf::Direction) -> &'static str {
    match d {
        corral_ebpf::Direction::FromInstance => "transmit",
        corral_ebpf::Direction::ToInstance => "receive",
    }
}

/// Traffic counters of the eBPF data plane, by tenant and by instance, and
/// drops by tenant and reason.
fn network(
    enc: &mut DescriptorEncoder<'_>,
    exec: &Executor,
    snaps: &[crate::executor::Snapshot],
) -> Result<(), std::fmt::Error> {
    let Some(plane) = exec.plane() else {
        return Ok(());
    };
    let Some(c) = plane.counters() else {
        return Ok(());
    };
    let tenant_rows = |bytes: bool| {
        c.tenants.iter().map(move |(t, d, v)| {
            let labels: Labels = vec![
                ("tenant", plane.tenant_name(*t)),
                ("direction", direction(*d).to_owned()),
            ];
            (
                labels,
                ConstCounter::new(if bytes { v.bytes } else { v.packets }),
            )
        })
    };
    family(
        enc,
        "tenant_network_bytes",
        "Bytes a tenant's instances sent (transmit) and received (receive), frames included",
        MetricType::Counter,
        tenant_rows(true),
    )?;
    family(
        enc,
        "tenant_network_packets",
        "Packets a tenant's instances sent and received",
        MetricType::Counter,
        tenant_rows(false),
    )?;
    let by_addr: std::collections::HashMap<u32, &crate::executor::Snapshot> = snaps
        .iter()
        .filter_map(|s| s.info.address.map(|a| (u32::from(a), s)))
        .collect();
    let by_addr = &by_addr;
    let instance_rows = |bytes: bool| {
        c.instances.iter().filter_map(move |(i, d, v)| {
            let s = by_addr.get(&i.get())?;
            let labels: Labels = vec![
                ("instance", s.info.id.to_string()),
                ("tenant", s.info.tenant.to_string()),
                ("app", s.info.app.to_string()),
                ("direction", direction(*d).to_owned()),
            ];
            Some((
                labels,
                ConstCounter::new(if bytes { v.bytes } else { v.packets }),
            ))
        })
    };
    family(
        enc,
        "instance_network_bytes",
        "Bytes an instance sent and received",
        MetricType::Counter,
        instance_rows(true),
    )?;
    family(
        enc,
        "instance_network_packets",
        "Packets an instance sent and received",
        MetricType::Counter,
        instance_rows(false),
    )?;
    family(
        enc,
        "network_drops",
        "Packets the data plane dropped, by tenant and reason",
        MetricType::Counter,
        c.drops.iter().map(|(t, r, v)| {
            let tenant = t.map_or_else(|| "unknown".to_owned(), |t| plane.tenant_name(t));
            let labels: Labels = vec![("tenant", tenant), ("reason", r.as_str().to_owned())];
            (labels, ConstCounter::new(v.packets))
        }),
    )?;
    Ok(())
}

/// Renders the registry in the Prometheus text format.
pub fn render(reg: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, reg).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::wire::Message;

    #[test]
    fn brain_metrics_render_with_bounded_labels() {
        let m = Arc::new(Metrics::new());
        m.brain_connected.set(1);
        m.brain_connects.inc();
        m.count_brain_message(true, &Message::Ping { seq: 1 });
        m.count_brain_message(false, &Message::RequestState);
        let text = render(&m.registry(Weak::new()));
        assert!(text.contains("corral_brain_connected 1"), "{text}");
        assert!(text.contains("corral_brain_connects_total 1"), "{text}");
        assert!(
            text.contains(r#"corral_brain_messages_total{direction="sent",type="ping"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"corral_brain_messages_total{direction="received",type="request-state"} 1"#
            ),
            "{text}"
        );
    }
}
