//! `varco simulate --compare`: the same click day three times through
//! varco, on the same demo portal: a fixed rate too high, a fixed rate too
//! low, and adaptive admission, which is told neither.

use std::time::Duration;

use super::simulate::{percentile, through_varco, Run, SimSettings, REQUESTS_PER_APPLICATION};

#[derive(Debug, Clone)]
pub struct CompareSettings {
    pub sim: SimSettings,
    pub too_high_per_minute: f64,
    pub too_low_per_minute: f64,
    pub adaptive_min_per_minute: f64,
    pub adaptive_max_per_minute: f64,
    pub target_latency: Duration,
}

impl CompareSettings {
    /// The portal's knee in new sessions a minute (see `Portal::knee_per_minute`).
    pub fn knee_per_minute(&self) -> f64 {
        60.0 * self.sim.capacity as f64
            / (self.sim.service_time.as_secs_f64() * REQUESTS_PER_APPLICATION as f64)
    }

    /// A portal of `capacity` requests at once, 200 ms a request (at 8,
    /// the default, its knee is 800 a minute); the fixed rates at three
    /// times and three tenths of its knee, adaptive's ceiling at five:
    /// worked out from the capacity, or another one would make "too high"
    /// a rate below the knee.
    pub fn default_for(citizens: usize, seconds: u64, capacity: usize) -> Self {
        let sim = SimSettings {
            citizens,
            capacity,
            service_time: Duration::from_millis(200),
            patience: Duration::from_secs(seconds),
            poll: Duration::from_secs(1),
            ..SimSettings::default()
        };
        let mut c = CompareSettings {
            sim,
            too_high_per_minute: 0.0,
            too_low_per_minute: 0.0,
            adaptive_min_per_minute: 60.0,
            adaptive_max_per_minute: 0.0,
            target_latency: Duration::from_millis(400),
        };
        let knee = c.knee_per_minute();
        c.too_high_per_minute = (3.0 * knee).round();
        c.too_low_per_minute = (0.3 * knee).round();
        c.adaptive_max_per_minute = (5.0 * knee).round();
        c
    }

    /// The room table lines for adaptive admission.
    pub fn adaptive_room(&self) -> String {
        format!(
            "adaptive = {{ min_per_minute = {}, max_per_minute = {}, target_latency = \"{}ms\", interval = \"1s\", step_per_minute = {} }}",
            self.adaptive_min_per_minute,
            self.adaptive_max_per_minute,
            self.target_latency.as_millis(),
            (self.knee_per_minute() / 12.0).round().max(1.0),
        )
    }
}

/// The three runs, labelled.
pub async fn run(c: &CompareSettings) -> Result<Vec<(String, Run)>, String> {
    let fixed = |r: f64| format!("admission_per_minute = {r}");
    let plans = [
        (
            format!("fixed {} /min (too high)", c.too_high_per_minute),
            fixed(c.too_high_per_minute),
        ),
        (
            format!("fixed {} /min (too low)", c.too_low_per_minute),
            fixed(c.too_low_per_minute),
        ),
        ("adaptive".to_string(), c.adaptive_room()),
    ];
    let mut out = Vec::new();
    for (label, room) in plans {
        out.push((label, through_varco(&c.sim, &room, &[]).await?));
    }
    Ok(out)
}

/// A row of the report: its name and how a run fills its cell.
type Row = Box<dyn Fn(&Run) -> String>;

pub fn report(c: &CompareSettings, runs: &[(String, Run)]) -> String {
    let mut out = format!(
        "click day through varco: {} citizens, each patient for {} s; demo portal capacity {} at {} ms a request, \
         so its knee is {:.0} new sessions/min ({} requests each); adaptive: {}\n\n",
        c.sim.citizens,
        c.sim.patience.as_secs(),
        c.sim.capacity,
        c.sim.service_time.as_millis(),
        c.knee_per_minute(),
        REQUESTS_PER_APPLICATION,
        c.adaptive_room(),
    );
    out.push_str(&format!("{:<32}", ""));
    for (label, _) in runs {
        out.push_str(&format!(" {label:>28}"));
    }
    out.push('\n');
    let secs = |v: Option<f64>| v.map(|x| format!("{x:.1} s")).unwrap_or_else(|| "-".into());
    let rows: Vec<(&str, Row)> = vec![
        (
            "applications completed",
            Box::new(|r: &Run| format!("{}/{}", r.outcome.completed, r.outcome.citizens)),
        ),
        (
            "applications per minute",
            Box::new(|r: &Run| format!("{:.0}", r.completed_per_minute())),
        ),
        (
            "portal 5xx rate",
            Box::new(|r: &Run| format!("{:.1}%", 100.0 * r.outcome.error_rate())),
        ),
        (
            "median wait in line",
            Box::new(move |r: &Run| secs(percentile(&r.outcome.wait_seconds, 0.5))),
        ),
        (
            "p99 wait in line",
            Box::new(move |r: &Run| secs(percentile(&r.outcome.wait_seconds, 0.99))),
        ),
        (
            "median rate, second half",
            Box::new(|r: &Run| {
                r.median_rate(r.seconds / 2.0, r.seconds)
                    .map(|x| format!("{x:.0} /min"))
                    .unwrap_or_else(|| "-".into())
            }),
        ),
    ];
    for (name, f) in rows {
        out.push_str(&format!("{name:<32}"));
        for (_, r) in runs {
            out.push_str(&format!(" {:>28}", f(r)));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rates_are_worked_out_from_the_portals_capacity() {
        for capacity in [1, 8, 100] {
            let c = CompareSettings::default_for(100, 60, capacity);
            let knee = c.knee_per_minute();
            assert!(c.too_high_per_minute > knee, "{capacity}: {c:?}");
            assert!(c.too_low_per_minute < knee, "{capacity}: {c:?}");
            assert!(c.adaptive_max_per_minute > knee, "{capacity}: {c:?}");
        }
    }
}
