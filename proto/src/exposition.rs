//! The Prometheus exposition formats. The daemons render OpenMetrics text
//! (`prometheus-client`); a scraper that does not ask for OpenMetrics in
//! its `Accept` header (curl, `promtool check metrics`, older agents) gets
//! the classic text format 0.0.4 instead, as the Go client does. Pure.

/// Content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic text format.
pub const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (with a non-zero q).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            let q_zero = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
        })
    })
}

/// The body and content type for a scraper that sent `accept`.
pub fn negotiate(openmetrics: String, accept: Option<&str>) -> (String, &'static str) {
    if wants_openmetrics(accept) {
        (openmetrics, OPENMETRICS)
    } else {
        (to_text_004(&openmetrics), TEXT_004)
    }
}

/// Rewrites OpenMetrics text as the classic format: counter families are
/// named by their `_total` samples, `# UNIT` and `# EOF` go, `unknown`
/// becomes `untyped`, and counters' `_created` samples are dropped.
pub fn to_text_004(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .filter(|name| !name.ends_with("_total"))
        .collect();
    let is_counter = |name: &str| counters.contains(&name);
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if is_counter(name) {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            out.push_str(&format!("# HELP {name} {text}\n"));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = if kind == "unknown" { "untyped" } else { kind };
            let name = if is_counter(name) {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or_default();
        if sample.strip_suffix("_created").is_some_and(is_counter) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "\
# HELP corral_instance_ends Instances that ended.
# TYPE corral_instance_ends counter
corral_instance_ends_total{kind=\"lrp\",state=\"crashed\"} 1
corral_instance_ends_created{kind=\"lrp\",state=\"crashed\"} 1700000000.0
# HELP corral_brain_auction_duration_seconds Round time.
# TYPE corral_brain_auction_duration_seconds histogram
# UNIT corral_brain_auction_duration_seconds seconds
corral_brain_auction_duration_seconds_sum 0.5
corral_brain_auction_duration_seconds_count 1
corral_brain_auction_duration_seconds_bucket{le=\"+Inf\"} 1
# HELP corral_cell_evacuating 1 while draining.
# TYPE corral_cell_evacuating gauge
corral_cell_evacuating 0
# HELP x Something.
# TYPE x unknown
x 3
# EOF
";

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let t = to_text_004(OM);
        assert_eq!(
            t,
            "\
# HELP corral_instance_ends_total Instances that ended.
# TYPE corral_instance_ends_total counter
corral_instance_ends_total{kind=\"lrp\",state=\"crashed\"} 1
# HELP corral_brain_auction_duration_seconds Round time.
# TYPE corral_brain_auction_duration_seconds histogram
corral_brain_auction_duration_seconds_sum 0.5
corral_brain_auction_duration_seconds_count 1
corral_brain_auction_duration_seconds_bucket{le=\"+Inf\"} 1
# HELP corral_cell_evacuating 1 while draining.
# TYPE corral_cell_evacuating gauge
corral_cell_evacuating 0
# HELP x Something.
# TYPE x untyped
x 3
"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(wants_openmetrics(Some("Application/OpenMetrics-Text")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
        let (body, ct) = negotiate(OM.to_owned(), Some(prometheus));
        assert_eq!((body.as_str(), ct), (OM, OPENMETRICS));
        let (body, ct) = negotiate(OM.to_owned(), None);
        assert_eq!(ct, TEXT_004);
        assert!(!body.contains("# EOF"));
    }
}
