//! A room's upstreams: round-robin choice, skipping any that recently
//! failed (refused a connection, gave no answer within the response
//! timeout, or broke the exchange): passive health with a cool-down.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Uri;

pub struct Upstream {
    /// `http://host:port/`, the base every request's path is put on.
    pub base: Uri,
    /// `host:port`, the metric label and log field.
    pub label: String,
    /// Milliseconds since the pool's epoch until which this upstream is
    /// skipped; 0 when healthy.
    down_until_ms: AtomicU64,
}

pub struct UpstreamPool {
    upstreams: Vec<Upstream>,
    next: AtomicUsize,
    cooldown: Duration,
    epoch: Instant,
}

impl UpstreamPool {
    pub fn new(bases: &[Uri], cooldown: Duration) -> Self {
        let upstreams = bases
            .iter()
            .map(|b| Upstream {
                label: b.authority().map(|a| a.to_string()).unwrap_or_default(),
                base: b.clone(),
                down_until_ms: AtomicU64::new(0),
            })
            .collect();
        UpstreamPool {
            upstreams,
            next: AtomicUsize::new(0),
            cooldown,
            epoch: Instant::now(),
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
        self.upstreams[index].down_until_ms.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// The next upstream in rotation that is healthy and not in `tried`.
    /// When every untried one is cooling down, the next untried one anyway:
    /// a pool that is all down must still be probed, or it never recovers.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = (0..n)
            .map(|i| (start + i) % n)
            .filter(|i| !tried.contains(i));
        let mut fallback = None;
        for i in candidates {
            if self.is_healthy(i) {
                return Some(i);
            }
            fallback.get_or_insert(i);
        }
        fallback
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
    fn all_down_still_probes_and_tried_are_excluded() {
        let p = pool(2);
        p.mark_failed(0);
        p.mark_failed(1);
        assert!(p.pick(&[]).is_some());
        assert_eq!(p.pick(&[0]), Some(1));
        assert_eq!(p.pick(&[0, 1]), None);
    }
}
