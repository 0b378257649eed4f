//! How answers spread over backends compared with their weights.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use crate::{TrafficReport, SHARE_TOLERANCE_PP};

/// One backend's line of a [`Distribution`].
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub backend: String,
    pub weight: u32,
    pub count: usize,
    /// Share of all answers, in percent.
    pub share_pct: f64,
    /// Share of the total weight, in percent.
    pub weight_share_pct: f64,
    /// `share_pct - weight_share_pct`, in percentage points.
    pub deviation_pp: f64,
}

/// Answers per backend next to the share each backend's weight asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    pub title: String,
    pub rows: Vec<Row>,
    pub total: usize,
}

impl Distribution {
    /// `weights` lists the configured backends in display order; `counts` the answers per
    /// backend name. A backend that answered but is not in `weights` gets a weight-0 row.
    pub fn new(title: &str, weights: &[(String, u32)], counts: &BTreeMap<String, usize>) -> Self {
        let mut entries: Vec<(String, u32)> = weights.to_vec();
        for name in counts.keys() {
            if !entries.iter().any(|(n, _)| n == name) {
                entries.push((name.clone(), 0));
            }
        }
        let total: usize = counts.values().sum();
        let total_weight: u64 = entries.iter().map(|(_, w)| u64::from(*w)).sum();
        let rows = entries
            .into_iter()
            .map(|(backend, weight)| {
                let count = counts.get(&backend).copied().unwrap_or(0);
                let share_pct = percent(count as f64, total as f64);
                let weight_share_pct = percent(f64::from(weight), total_weight as f64);
                Row {
                    backend,
                    weight,
                    count,
                    share_pct,
                    weight_share_pct,
                    deviation_pp: share_pct - weight_share_pct,
                }
            })
            .collect();
        Distribution {
            title: title.to_owned(),
            rows,
            total,
        }
    }

    /// Largest absolute deviation from the weight share, in percentage points.
    pub fn max_deviation_pp(&self) -> f64 {
        self.rows
            .iter()
            .map(|r| r.deviation_pp.abs())
            .fold(0.0, f64::max)
    }

    /// Fails, naming each offending backend, if a share is more than `tolerance_pp`
    /// percentage points off its weight share or if there were no answers at all.
    pub fn check(&self, tolerance_pp: f64) -> Result<(), String> {
        if self.total == 0 {
            return Err(format!("{}: no answers", self.title));
        }
        let bad: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.deviation_pp.abs() > tolerance_pp)
            .map(|r| {
                format!(
                    "{} has {:.1}% of {} answers, weight share {:.1}% (off by {:+.1} points)",
                    r.backend, r.share_pct, self.total, r.weight_share_pct, r.deviation_pp
                )
            })
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{}: shares off by more than {tolerance_pp} points:\n  {}\n{self}",
                self.title,
                bad.join("\n  ")
            ))
        }
    }
}

fn percent(part: f64, whole: f64) -> f64 {
    if whole == 0.0 {
        0.0
    } else {
        100.0 * part / whole
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .rows
            .iter()
            .map(|r| r.backend.len())
            .chain(["backend".len(), "total".len()])
            .max()
            .unwrap_or(7);
        writeln!(f, "{}", self.title)?;
        writeln!(
            f,
            "{:<width$}  {:>6}  {:>7}  {:>7}  {:>12}  {:>9}",
            "backend", "weight", "count", "share", "weight share", "deviation"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<width$}  {:>6}  {:>7}  {:>6.1}%  {:>11.1}%  {:>+6.1} pp",
                r.backend, r.weight, r.count, r.share_pct, r.weight_share_pct, r.deviation_pp
            )?;
        }
        writeln!(
            f,
            "{:<width$}  {:>6}  {:>7}  {:>6.1}%  {:>11.1}%",
            "total",
            self.rows.iter().map(|r| r.weight).sum::<u32>(),
            self.total,
            if self.total == 0 { 0.0 } else { 100.0 },
            100.0
        )
    }
}

/// Every request answered, shares within tolerance, and backends saw the client's own address.
pub fn assert_balanced(
    what: &str,
    report: &TrafficReport,
    expected: usize,
    pool: &[(String, u32)],
    client: IpAddr,
) {
    let table = Distribution::new(what, pool, &report.counts);
    println!("{}\n{table}", report.summary(what));
    assert!(
        report.failures.is_empty() && report.answered() == expected,
        "{what}: {} of {expected} answered\n{}",
        report.answered(),
        report.summary(what)
    );
    assert_eq!(
        report.distinct_source_ports, expected,
        "{what}: every request should come from its own source port"
    );
    if let Err(e) = table.check(SHARE_TOLERANCE_PP) {
        panic!("{e}");
    }
    assert_eq!(
        report.peer_ips(),
        BTreeSet::from([client]),
        "{what}: backends must see the client's real address"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
        pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    }

    fn weights(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
        pairs.iter().map(|(n, w)| (n.to_string(), *w)).collect()
    }

    #[test]
    fn shares_and_deviation() {
        let d = Distribution::new(
            "t",
            &weights(&[("b1", 1), ("b2", 3)]),
            &counts(&[("b1", 30), ("b2", 70)]),
        );
        assert_eq!(d.total, 100);
        assert!((d.rows[0].share_pct - 30.0).abs() < 1e-9);
        assert!((d.rows[0].weight_share_pct - 25.0).abs() < 1e-9);
        assert!((d.rows[0].deviation_pp - 5.0).abs() < 1e-9);
        assert!((d.rows[1].deviation_pp + 5.0).abs() < 1e-9);
        assert!((d.max_deviation_pp() - 5.0).abs() < 1e-9);
        assert!(d.check(5.0).is_ok());
        let err = d.check(4.9).unwrap_err();
        assert!(err.contains("b1") && err.contains("b2"), "{err}");
    }

    #[test]
    fn unknown_backend_gets_weight_zero_row() {
        let d = Distribution::new("t", &weights(&[("b1", 1)]), &counts(&[("b1", 5), ("x", 5)]));
        assert_eq!(d.rows.len(), 2);
        assert_eq!(d.rows[1].backend, "x");
        assert_eq!(d.rows[1].weight, 0);
        assert!(d.check(10.0).is_err());
    }

    #[test]
    fn no_answers_fails_the_check() {
        let d = Distribution::new("t", &weights(&[("b1", 1)]), &BTreeMap::new());
        assert!(d.check(100.0).is_err());
    }

    #[test]
    fn renders_every_backend() {
        let d = Distribution::new(
            "TCP",
            &weights(&[("b1", 1), ("b2", 2)]),
            &counts(&[("b1", 1), ("b2", 2)]),
        );
        let text = d.to_string();
        assert!(text.starts_with("TCP\n"), "{text}");
        assert!(text.contains("b1") && text.contains("b2") && text.contains("total"));
        assert!(text.contains("33.3%") && text.contains("66.7%"), "{text}");
    }
}
