//! The Grafana dashboard (docs/grafana/corral.json) references only metrics
//! that docs/metrics.md documents. docs/metrics.md is itself checked against
//! real scrapes of a cell and a brain (tests/tests/metrics.rs), and every
//! dashboard expression is evaluated by a real Prometheus
//! (tests/tests/prometheus.rs); together they keep the dashboard honest.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Series Prometheus makes itself for every target.
const PROMETHEUS_SERIES: &[&str] = &["up", "scrape_duration_seconds", "scrape_samples_scraped"];

/// Aggregation operators and keywords: identifiers that name no series.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// Modifiers followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The series names a PromQL expression selects: identifiers that are not
/// functions, aggregations, keywords, label names (in `{}` or in `by (...)`
/// and friends), label values (strings), durations or Grafana variables.
pub fn series_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    let is_start = |c: u8| c.is_ascii_alphabetic() || c == b'_' || c == b':';
    let is_part = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => i = skip_string(b, i),
            b'{' => i = skip_group(b, i, b'{', b'}'),
            b'[' => i = skip_group(b, i, b'[', b']'),
            b'$' => {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    i = skip_group(b, i, b'{', b'}');
                } else {
                    while i < b.len() && is_part(b[i]) {
                        i += 1;
                    }
                }
            }
            _ if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                // Numbers and durations (1e3, 0.99, 5m).
                while i < b.len() && (is_part(b[i]) || b[i] == b'.') {
                    i += 1;
                }
            }
            _ if is_start(c) => {
                let start = i;
                while i < b.len() && is_part(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                let call = b.get(j) == Some(&b'(');
                if LABEL_LISTS.contains(&word) {
                    if call {
                        i = skip_group(b, j, b'(', b')');
                    }
                } else if !call && !KEYWORDS.contains(&word) {
                    out.insert(word.to_owned());
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Index just past the string starting at `i` (its quote), escapes included.
fn skip_string(b: &[u8], i: usize) -> usize {
    let quote = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != quote {
        if b[j] == b'\\' && quote != b'`' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// Index just past the bracket closing the one at `i` (nesting and strings
/// inside respected).
fn skip_group(b: &[u8], i: usize, open: u8, close: u8) -> usize {
    let mut depth = 0;
    let mut j = i;
    while j < b.len() {
        match b[j] {
            q @ (b'"' | b'\'' | b'`') if q != open => {
                j = skip_string(b, j);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

/// Every PromQL expression in a dashboard: panel targets' `expr` (panels
/// nested in rows included), and the series selectors of template
/// variables' `label_values(selector, label)` / `query_result(...)`.
pub fn expressions(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(e) = m.get("expr").and_then(Value::as_str) {
                    out.push(e.to_owned());
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or_default()
            .trim();
        if let Some(args) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            // The last argument is a label name; a lone one selects nothing.
            if let Some((selector, _label)) = args.rsplit_once(',') {
                out.push(selector.to_owned());
            }
        } else if let Some(inner) = q
            .strip_prefix("query_result(")
            .and_then(|r| r.strip_suffix(')'))
        {
            out.push(inner.to_owned());
        }
    }
    out
}

/// The documented families of docs/metrics.md (`| \`name\` | type | ...`
/// table rows): name → type.
pub fn documented(metrics_md: &str) -> BTreeMap<String, String> {
    metrics_md
        .lines()
        .filter_map(|l| {
            let mut cells = l.split('|').map(str::trim).skip(1);
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let ty = cells.next()?;
            Some((name.to_owned(), ty.to_owned()))
        })
        .collect()
}

/// The series names a documented family exposes: a histogram's `_bucket`,
/// `_sum` and `_count`; a counter's name as documented (with `_total`) and
/// with `_total` added when the table left it out; a gauge's own name.
pub fn exposed_series(docs: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (name, ty) in docs {
        match ty.as_str() {
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            "counter" if !name.ends_with("_total") => {
                out.insert(format!("{name}_total"));
            }
            _ => {
                out.insert(name.clone());
            }
        }
    }
    out
}

/// Series names the dashboard uses that no documented family exposes, with
/// the expression that uses each.
pub fn unknown_series(dashboard: &Value, metrics_md: &str) -> Vec<(String, String)> {
    let exposed = exposed_series(&documented(metrics_md));
    let mut bad = Vec::new();
    for e in expressions(dashboard) {
        for name in series_names(&e) {
            if !exposed.contains(&name) && !PROMETHEUS_SERIES.contains(&name.as_str()) {
                bad.push((name, e.clone()));
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::workspace_root;

    fn names(e: &str) -> Vec<String> {
        series_names(e).into_iter().collect()
    }

    #[test]
    fn finds_series_and_skips_functions_labels_and_variables() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.99, sum by (le) (rate(corral_x_seconds_bucket{instance=~"$cell", a="b}c"}[$__rate_interval])))"#
            ),
            ["corral_x_seconds_bucket"]
        );
        assert_eq!(
            names("1 - a_bytes{x=\"y\"} / on (instance) group_left (zone) b_bytes offset 5m"),
            ["a_bytes", "b_bytes"]
        );
        assert_eq!(
            names("topk(10, sum without (pod) (rate(c_total[${__range}])))"),
            ["c_total"]
        );
        assert_eq!(names("sum(x) by (job) and bool y > 1e3"), ["x", "y"]);
        assert_eq!(names("count_values(\"v\", up)"), ["up"]);
        assert_eq!(names("rate(m[5m:30s]) or vector(0)"), ["m"]);
    }

    #[test]
    fn documented_families_expose_their_sample_names() {
        let md = "| metric | type |\n|---|---|\n\
                  | `h_seconds` | histogram | x |\n\
                  | `c_total` | counter | | y |\n\
                  | `g` | gauge | |\n";
        let docs = documented(md);
        assert_eq!(docs.len(), 3, "{docs:?}");
        let s = exposed_series(&docs);
        for n in [
            "h_seconds_bucket",
            "h_seconds_sum",
            "h_seconds_count",
            "c_total",
            "g",
        ] {
            assert!(s.contains(n), "{n}: {s:?}");
        }
        assert!(!s.contains("h_seconds"));
        assert!(!s.contains("c_total_total"));
    }

    #[test]
    fn an_undocumented_series_is_reported() {
        let md = "| `a_total` | counter | |\n";
        let dash = serde_json::json!({
            "panels": [{"type": "row", "panels": [{"targets": [{"expr": "rate(a_total[1m]) + b"}]}]}],
            "templating": {"list": [{"query": {"query": "label_values(c{x=\"1\"}, x)"}}]}
        });
        let bad: Vec<String> = unknown_series(&dash, md)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(bad, ["b", "c"]);
    }

    /// The real dashboard against the real docs.
    #[test]
    fn the_grafana_dashboard_references_only_documented_metrics() {
        let root = workspace_root();
        let read = |p: &str| {
            std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("read {p}: {e}"))
        };
        let dash: Value = serde_json::from_str(&read("docs/grafana/corral.json"))
            .unwrap_or_else(|e| panic!("docs/grafana/corral.json is not JSON: {e}"));
        let md = read("docs/metrics.md");
        assert!(
            documented(&md).len() > 30,
            "docs/metrics.md tables not found"
        );
        assert_eq!(unknown_series(&dash, &md), Vec::<(String, String)>::new());

        let exprs = expressions(&dash);
        let used: BTreeSet<String> = exprs.iter().flat_map(|e| series_names(e)).collect();
        // What the dashboard is for (issue 6): each of these is on it.
        for must in [
            "corral_cell_memory_capacity_bytes",
            "corral_cell_memory_available_bytes",
            "corral_cell_disk_capacity_bytes",
            "corral_cell_containers_available",
            "corral_instances",
            "corral_instance_start_duration_seconds_bucket",
            "corral_instance_ends_total",
            "corral_brain_instance_crashes_total",
            "corral_oom_kills_total",
            "corral_brain_auctions_total",
            "corral_brain_auction_duration_seconds_bucket",
            "corral_brain_placements_total",
            "corral_brain_placement_failures_total",
            "corral_brain_instances_desired",
            "corral_brain_instances_running",
            "corral_tenant_network_bytes_total",
            "corral_tenant_network_packets_total",
            "corral_network_drops_total",
            "corral_lb_services",
            "corral_lb_backends",
            "corral_north_south_packets_total",
        ] {
            assert!(used.contains(must), "no panel shows {must}");
        }

        // Importable: a datasource input, and every panel and target uses it.
        assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
        let mut ids = BTreeSet::new();
        for p in dash["panels"].as_array().into_iter().flatten() {
            assert!(
                ids.insert(p["id"].as_u64()),
                "duplicate panel id {}",
                p["id"]
            );
            if p["type"] == "row" {
                continue;
            }
            let targets = p["targets"].as_array().map_or(&[][..], Vec::as_slice);
            assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
            for t in std::iter::once(p).chain(targets) {
                assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            }
        }
    }
}
