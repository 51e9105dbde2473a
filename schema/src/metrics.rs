//! How a service declares the metrics it exports: one list per service, each entry with its
//! kind, labels and histogram buckets, so the recorder, the deploy checks and the docs all read
//! the same definitions instead of repeating names by hand.

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
}
