//! How a service declares the metrics it exports (one list per service, each entry with its
//! kind, labels and histogram buckets, so the recorder, the deploy checks and the docs all read
//! the same definitions instead of repeating names by hand), and the one Prometheus recorder
//! both services install from those buckets.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// What Prometheus type a metric is exported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A monotonically increasing count (`_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution over fixed buckets.
    Histogram,
}

/// One exported metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metric {
    /// The Prometheus name, `sluice_<service>_<what>_<unit>`.
    pub name: &'static str,
    /// Its Prometheus type.
    pub kind: Kind,
    /// Its label names; every label's values are a bounded set.
    pub labels: &'static [&'static str],
    /// Bucket upper bounds, for histograms only.
    pub buckets: &'static [f64],
    /// What it measures, in a line.
    pub help: &'static str,
}

impl Metric {
    /// A counter with these labels.
    pub const fn counter(
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Metric {
        Metric {
            name,
            kind: Kind::Counter,
            labels,
            buckets: &[],
            help,
        }
    }

    /// A gauge with these labels.
    pub const fn gauge(
        name: &'static str,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Metric {
        Metric {
            name,
            kind: Kind::Gauge,
            labels,
            buckets: &[],
            help,
        }
    }

    /// A histogram with these labels and bucket upper bounds.
    pub const fn histogram(
        name: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
        help: &'static str,
    ) -> Metric {
        Metric {
            name,
            kind: Kind::Histogram,
            labels,
            buckets,
            help,
        }
    }
}

/// Bucket bounds shared by both services' durations: 0.5 ms to 10 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Which metric names a [`BucketRule`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Exactly this name.
    Name(&'static str),
    /// Every name ending so (`_duration_seconds`, `_bytes`).
    Suffix(&'static str),
}

/// Histogram buckets for the metrics a [`Match`] selects. Without a rule the exporter renders
/// a histogram as a summary, whose quantiles cannot be aggregated across instances (no
/// `_bucket` series): docs/architecture.md §7.1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketRule {
    /// The names it applies to.
    pub matcher: Match,
    /// Bucket upper bounds, ascending.
    pub bounds: &'static [f64],
}

impl BucketRule {
    /// Buckets for exactly the metric `name`.
    pub const fn name(name: &'static str, bounds: &'static [f64]) -> BucketRule {
        BucketRule {
            matcher: Match::Name(name),
            bounds,
        }
    }

    /// Buckets for every metric whose name ends with `suffix`.
    pub const fn suffix(suffix: &'static str, bounds: &'static [f64]) -> BucketRule {
        BucketRule {
            matcher: Match::Suffix(suffix),
            bounds,
        }
    }

    /// One rule per histogram of a service's declared list, with its own buckets.
    pub fn from_metrics(metrics: &[Metric]) -> Vec<BucketRule> {
        metrics
            .iter()
            .filter(|m| m.kind == Kind::Histogram)
            .map(|m| BucketRule::name(m.name, m.buckets))
            .collect()
    }
}

/// The exporter with these bucket rules; an empty bound list is refused.
fn builder(rules: &[BucketRule]) -> Result<PrometheusBuilder, String> {
    rules.iter().try_fold(PrometheusBuilder::new(), |b, rule| {
        let matcher = match rule.matcher {
            Match::Name(n) => Matcher::Full(n.into()),
            Match::Suffix(s) => Matcher::Suffix(s.into()),
        };
        b.set_buckets_for_metric(matcher, rule.bounds)
            .map_err(|e| format!("buckets of {:?}: {e}", rule.matcher))
    })
}

/// The process-wide Prometheus recorder, installed by the first call with that caller's
/// `rules`: `metrics` allows one global recorder, so services sharing a process (tests) share
/// it, and later calls get the same handle whatever rules they pass. Install it before the
/// first metric is recorded: until then the `metrics` macros record nowhere. Fails only when
/// a recorder not installed here holds the slot, or a rule has no bounds.
pub fn recorder(rules: &[BucketRule]) -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            builder(rules)?
                .install_recorder()
                .map_err(|e| e.to_string())
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_keep_kind_labels_and_buckets() {
        const M: Metric = Metric::histogram("sluice_x_seconds", &["a"], SECONDS_BUCKETS, "x");
        assert_eq!(M.kind, Kind::Histogram);
        assert_eq!(M.labels, &["a"]);
        assert_eq!(M.buckets.len(), 14);
        assert!(Metric::counter("c_total", &[], "c").buckets.is_empty());
        assert_eq!(Metric::gauge("g", &[], "g").kind, Kind::Gauge);
    }

    #[test]
    fn every_declared_histogram_gets_its_own_buckets_and_nothing_else_does() {
        const LIST: &[Metric] = &[
            Metric::counter("c_total", &[], "c"),
            Metric::histogram("h_seconds", &[], SECONDS_BUCKETS, "h"),
            Metric::histogram("rows", &[], &[1.0, 10.0], "r"),
        ];
        assert_eq!(
            BucketRule::from_metrics(LIST),
            [
                BucketRule::name("h_seconds", SECONDS_BUCKETS),
                BucketRule::name("rows", &[1.0, 10.0]),
            ]
        );
    }

    #[test]
    fn a_rule_without_bounds_is_refused_and_named() {
        let err = builder(&[BucketRule::suffix("_bytes", &[])]).unwrap_err();
        assert!(err.contains("Suffix(\"_bytes\")"), "{err}");
        assert!(builder(&[BucketRule::suffix("_seconds", SECONDS_BUCKETS)]).is_ok());
    }
}
