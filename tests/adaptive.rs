//! Adaptive admission against the real demo portal with a known capacity
//! knee: the rate climbs to just under the knee without the portal
//! failing, backs off within seconds when the portal loses half its
//! strength, and climbs back when it returns.

use std::time::Duration;

use varco::demo::simulate::{through_varco, CapacityChange, SimSettings, REQUESTS_PER_APPLICATION};

/// Demo portal: 8 requests at once at 200 ms each; 3 requests a person.
const CAPACITY: usize = 8;
const SERVICE: Duration = Duration::from_millis(200);

fn knee(capacity: usize) -> f64 {
    60.0 * capacity as f64 / (SERVICE.as_secs_f64() * REQUESTS_PER_APPLICATION as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finds_the_knee_backs_off_and_recovers() {
    // 26 s at the full knee: two or three cycles of the sawtooth, so the
    // median is of the sawtooth, not of where one cycle happened to be.
    let (drop_at, back_at, end) = (40.0, 52.0, 74.0);
    let s = SimSettings {
        citizens: 1000,
        capacity: CAPACITY,
        service_time: SERVICE,
        patience: Duration::from_secs_f64(end),
        poll: Duration::from_secs(1),
        ..SimSettings::default()
    };
    let high = knee(CAPACITY);
    let low = knee(CAPACITY / 2);
    // The operator knows only a floor, a generous ceiling and the latency
    // the portal should keep (twice its unloaded time); the rate starts
    // at the floor. The in-flight cap, twice the capacity they believe
    // in, keeps the admitted people's retries from piling onto a portal
    // that just lost half its strength (the collapse no rate can undo).
    let room = format!(
        "adaptive = {{ min_per_minute = 60, max_per_minute = {}, target_latency = \"400ms\", interval = \"1s\", step_per_minute = 60 }}\n\
         in_flight = {{ limit = {} }}",
        5.0 * high,
        2 * CAPACITY,
    );
    let run = through_varco(
        &s,
        &room,
        &[
            CapacityChange {
                at: Duration::from_secs_f64(drop_at),
                capacity: CAPACITY / 2,
            },
            CapacityChange {
                at: Duration::from_secs_f64(back_at),
                capacity: CAPACITY,
            },
        ],
    )
    .await
    .unwrap();
    for x in &run.timeline {
        eprintln!(
            "t={:>3.0} cap={} rate={:>5.0} admitted={:>3} answers={:>3} 5xx={:>2} p90={:>5.0}ms",
            x.t,
            x.capacity,
            x.rate_per_minute.unwrap_or(0.0),
            x.admitted,
            x.portal_answers,
            x.portal_5xx,
            x.p90_latency.unwrap_or(0.0) * 1000.0
        );
    }
    // How long after `from` the rate in force first satisfied `ok`.
    let first_after = |from: f64, ok: &dyn Fn(f64) -> bool| {
        run.timeline
            .iter()
            .filter(|x| x.t > from)
            .find(|x| x.rate_per_minute.is_some_and(ok))
            .map(|x| x.t - from)
    };
    let rate_at = |t: f64| {
        run.timeline
            .iter()
            .find(|x| x.t >= t)
            .and_then(|x| x.rate_per_minute)
            .unwrap_or(0.0)
    };

    // Converged: from 14 s to the drop, the rate sits within 25% below
    // the knee (the median of a sawtooth whose peaks touch a step over
    // it, cut by 30% each time), and the portal does not fail. Right
    // after a full build this 2-core machine runs slower for a while, the
    // portal's latency crosses the target before the knee, and one extra
    // cut put the median at 628 (0.79): 20% failed one run in four here.
    let settled = run.median_rate(14.0, drop_at).expect("rate sampled");
    assert!(
        settled >= 0.75 * high && settled <= 1.1 * high,
        "settled at {settled:.0}/min, knee {high:.0}"
    );
    let (answers, failed) = run.portal_answers(0.0, drop_at);
    assert!(answers > 300, "the crowd kept the portal busy: {answers}");
    assert!(
        (failed as f64) < 0.01 * answers as f64,
        "portal 5xx {failed} of {answers} while converging"
    );

    // Backs off within seconds of the portal losing half its strength:
    // from the top of the sawtooth under 1.1 x the new knee takes two
    // cuts, each after a second of slow answers; 10 s leaves a 2-core CI
    // machine room for one slow second (9 s was seen, against an 8 s
    // bound that failed one run in several).
    let backed_off = first_after(drop_at, &|r| r <= 1.1 * low);
    assert!(
        backed_off.is_some_and(|d| d <= 10.0),
        "rate not under {:.0}/min within 10 s of the drop: {backed_off:?}",
        1.1 * low
    );
    // ...and then holds around the new knee: each
    // time it passes it by 20%, it is back under within 4 s.
    let after_drop: Vec<_> = run
        .timeline
        .iter()
        .filter(|x| x.t > drop_at + 4.0 && x.t <= back_at)
        .collect();
    for (i, x) in after_drop.iter().enumerate() {
        if x.rate_per_minute.is_some_and(|r| r > 1.2 * low) {
            let back_under = after_drop[i..]
                .iter()
                .take_while(|y| y.t <= x.t + 4.0)
                .any(|y| y.rate_per_minute.is_some_and(|r| r <= 1.2 * low));
            assert!(
                back_under || x.t + 4.0 > back_at,
                "at {:.0} s the rate was {:.0}/min, knee {low:.0}, and stayed over",
                x.t,
                rate_at(x.t)
            );
        }
    }
    let held = run.mean_rate(drop_at + 4.0, back_at).expect("rate sampled");
    assert!(
        held <= 1.15 * low,
        "held {held:.0}/min with capacity halved, knee {low:.0}"
    );
    let (answers, failed) = run.portal_answers(drop_at, end);
    assert!(
        (failed as f64) < 0.05 * answers as f64,
        "portal 5xx {failed} of {answers} after the drop"
    );

    // Recovers when the capacity returns.
    let recovered = first_after(back_at, &|r| r >= 0.8 * high);
    assert!(
        recovered.is_some_and(|d| d <= 20.0),
        "rate not back over {:.0}/min within 20 s: {recovered:?}",
        0.8 * high
    );
    assert_eq!(run.outcome.crossed, 0);
}
