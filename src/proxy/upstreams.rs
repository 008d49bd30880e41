//! A room's upstreams: round-robin choice, skipping any that recently
//! failed (refused a connection, gave no answer within the response
//! timeout, or broke the exchange): passive health with a cool-down; and
//! any that failed `fall` active health checks in a row, until they pass
//! `rise` (see `health.rs`).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Uri;

pub struct Upstream {
    /// `http(s)://host[:port]/`, the base every request's path is put on.
    pub base: Uri,
    /// `host:port`, the metric label and log field.
    pub label: String,
    /// Milliseconds since the pool's epoch until which this upstream is
    /// skipped; 0 when healthy.
    down_until_ms: AtomicU64,
    /// Out of rotation by the active health checks.
    checked_down: AtomicBool,
    /// Checks in a row that disagree with `checked_down` (one checker
    /// per upstream writes it).
    streak: AtomicU32,
}

pub struct UpstreamPool {
    upstreams: Vec<Upstream>,
    next: AtomicUsize,
    cooldown: Duration,
    epoch: Instant,
    /// The health checks' tasks: stopped with the pool (a reload replaced
    /// it), so two checkers never judge one upstream.
    checks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

/// `host:port`, the port written out (80 for http, 443 for https): two
/// upstreams differ by it, `http://x` and `https://x` included.
pub fn label(base: &Uri) -> String {
    let host = base.host().unwrap_or_default();
    let port = base
        .port_u16()
        .unwrap_or(if base.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        self.stop_checks();
    }
}

impl UpstreamPool {
    pub fn new(bases: &[Uri], cooldown: Duration) -> Self {
        let upstreams = bases
            .iter()
            .map(|b| Upstream {
                label: label(b),
                base: b.clone(),
                down_until_ms: AtomicU64::new(0),
                checked_down: AtomicBool::new(false),
                streak: AtomicU32::new(0),
            })
            .collect();
        UpstreamPool {
            upstreams,
            next: AtomicUsize::new(0),
            cooldown,
            epoch: Instant::now(),
            checks: Default::default(),
        }
    }

    /// Takes the health checks' tasks, to stop them with the pool.
    pub fn run_checks(&self, tasks: Vec<tokio::task::AbortHandle>) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(tasks);
    }

    pub fn stop_checks(&self) {
        for task in self
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    pub fn get(&self, index: usize) -> &Upstream {
        &self.upstreams[index]
    }

    pub fn all(&self) -> &[Upstream] {
        &self.upstreams
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn is_healthy(&self, index: usize) -> bool {
        let u = &self.upstreams[index];
        !u.checked_down.load(Ordering::Relaxed)
            && u.down_until_ms.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// Takes the checks' verdicts from the same upstreams (by address) of
    /// the pool a reload replaces.
    pub fn keep_checks_of(&self, old: &UpstreamPool) {
        for u in &self.upstreams {
            if let Some(o) = old.upstreams.iter().find(|o| o.label == u.label) {
                let down = o.checked_down.load(Ordering::Relaxed);
                u.checked_down.store(down, Ordering::Relaxed);
                let streak = o.streak.load(Ordering::Relaxed);
                u.streak.store(streak, Ordering::Relaxed);
            }
        }
    }

    /// Counts one active check; `Some(in_rotation)` when this check moved
    /// the upstream out of rotation (`fall` failures in a row) or back
    /// (`rise` passes in a row).
    pub fn record_check(&self, index: usize, passed: bool, fall: u32, rise: u32) -> Option<bool> {
        let u = &self.upstreams[index];
        let down = u.checked_down.load(Ordering::Relaxed);
        if passed != down {
            u.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = u.streak.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < if down { rise } else { fall } {
            return None;
        }
        u.streak.store(0, Ordering::Relaxed);
        u.checked_down.store(!down, Ordering::Relaxed);
        Some(passed)
    }

    /// The next upstream in rotation that is healthy and not in `tried`.
    /// When every untried one is out, the next untried one anyway (one
    /// merely cooling down after a failed request before one the health
    /// checks found dead): a pool that is all down must still be probed,
    /// or it never recovers without checks.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = (0..n)
            .map(|i| (start + i) % n)
            .filter(|i| !tried.contains(i));
        let (mut cooling, mut checked_out) = (None, None);
        for i in candidates {
            if self.is_healthy(i) {
                return Some(i);
            }
            if self.upstreams[i].checked_down.load(Ordering::Relaxed) {
                checked_out.get_or_insert(i);
            } else {
                cooling.get_or_insert(i);
            }
        }
        cooling.or(checked_out)
    }

    pub fn mark_failed(&self, index: usize) {
        let until = self.now_ms() + self.cooldown.as_millis() as u64;
        self.upstreams[index]
            .down_until_ms
            .store(until, Ordering::Relaxed);
    }

    pub fn mark_healthy(&self, index: usize) {
        // A plain load first: the common case (already healthy) stays a read.
        if self.upstreams[index].down_until_ms.load(Ordering::Relaxed) != 0 {
            self.upstreams[index]
                .down_until_ms
                .store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> UpstreamPool {
        let bases: Vec<Uri> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}/", 9000 + i).parse().unwrap())
            .collect();
        UpstreamPool::new(&bases, Duration::from_secs(60))
    }

    #[test]
    fn round_robin_visits_each() {
        let p = pool(3);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn failed_upstream_is_skipped_until_healthy() {
        let p = pool(3);
        p.mark_failed(1);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&[]).unwrap()).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        p.mark_healthy(1);
        let picks: Vec<usize> = (0..3).map(|_| p.pick(&[]).unwrap()).collect();
        assert!(picks.contains(&1));
    }

    #[test]
    fn checks_take_an_upstream_out_after_fall_and_back_after_rise() {
        let p = pool(2);
        let (fall, rise) = (3, 2);
        assert_eq!(p.record_check(0, false, fall, rise), None);
        assert_eq!(p.record_check(0, false, fall, rise), None);
        assert_eq!(
            p.record_check(0, true, fall, rise),
            None,
            "a pass breaks the run"
        );
        assert_eq!(p.record_check(0, false, fall, rise), None);
        assert_eq!(p.record_check(0, false, fall, rise), None);
        assert!(p.is_healthy(0));
        assert_eq!(p.record_check(0, false, fall, rise), Some(false));
        assert!(!p.is_healthy(0));
        let picks: Vec<usize> = (0..4).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![1, 1, 1, 1]);
        assert_eq!(p.record_check(0, true, fall, rise), None);
        assert_eq!(
            p.record_check(0, false, fall, rise),
            None,
            "a failure breaks the run"
        );
        assert_eq!(p.record_check(0, true, fall, rise), None);
        assert_eq!(p.record_check(0, true, fall, rise), Some(true));
        assert!(p.is_healthy(0));
        p.mark_healthy(0);
        assert!(p.is_healthy(0));
    }

    #[test]
    fn a_reload_keeps_what_the_checks_found_by_address() {
        let old = pool(2);
        for _ in 0..3 {
            old.record_check(1, false, 3, 2);
        }
        assert!(!old.is_healthy(1));
        let bases: Vec<Uri> = [9001, 9002]
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}/").parse().unwrap())
            .collect();
        let new = UpstreamPool::new(&bases, Duration::from_secs(60));
        new.keep_checks_of(&old);
        assert!(
            !new.is_healthy(0),
            "127.0.0.1:9001 was out, at index 1 then"
        );
        assert!(new.is_healthy(1));
    }

    #[test]
    fn when_all_are_out_one_cooling_down_is_tried_before_one_checked_dead() {
        let p = pool(2);
        for _ in 0..3 {
            p.record_check(0, false, 3, 2);
        }
        p.mark_failed(1);
        let picks: Vec<usize> = (0..4).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![1, 1, 1, 1]);
        assert_eq!(p.pick(&[1]), Some(0), "and the dead one after it");
    }

    #[test]
    fn all_down_still_probes_and_tried_are_excluded() {
        let p = pool(2);
        p.mark_failed(0);
        p.mark_failed(1);
        assert!(p.pick(&[]).is_some());
        assert_eq!(p.pick(&[0]), Some(1));
        assert_eq!(p.pick(&[0, 1]), None);
    }
}
