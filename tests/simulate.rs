//! `varco simulate` in small: the demo portal falls over without varco and
//! serves everyone cleanly with it, in ticket order, nobody seeing another
//! citizen's page.

use std::time::Duration;

use varco::demo::simulate::{broken_promises, report, run, through_varco, SimSettings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varco_turns_a_crash_into_a_queue() {
    let s = SimSettings {
        citizens: 80,
        capacity: 4,
        service_time: Duration::from_millis(20),
        admission_per_minute: 1200,
        max_active: 8,
        patience: Duration::from_secs(60),
        ..SimSettings::default()
    };
    let (without, with) = run(&s).await.unwrap();
    eprintln!("{}", report(&s, &without, &with));
    assert!(
        without.portal_5xx > 0,
        "the crowd must overload the bare portal, or this test proves nothing"
    );
    assert_eq!(with.portal_5xx, 0, "varco let the portal fail");
    assert_eq!(
        with.completed, s.citizens,
        "everyone submitted through varco"
    );
    // The order is judged on the people who waited: enough of them, or
    // the check below proves nothing.
    assert!(
        with.ticketed >= s.citizens / 2,
        "only {} of {} waited in line",
        with.ticketed,
        s.citizens
    );
    assert_eq!(with.admitted, s.citizens);
    assert_eq!(with.order_inversions, 0, "let in out of arrival order");
    // A portal that failed behind varco shows as varco's 502 or 504.
    assert_eq!(with.gateway_errors, 0, "varco's own 502/504");
    assert_eq!(with.unanswered, 0, "requests with no answer");
    // Every completed application took three portal answers at least (the
    // page, the login's redirect, the submission): all counted in the 5xx
    // rate's denominator.
    assert!(
        with.portal_requests >= 3 * with.completed as u64,
        "{} portal answers for {} applications",
        with.portal_requests,
        with.completed
    );
    assert_eq!(with.crossed, 0);
    assert_eq!(without.crossed, 0);
    assert_eq!(broken_promises(&with), Vec::<String>::new());
    assert!(
        !broken_promises(&without).is_empty(),
        "the bare portal's 5xx are told"
    );
}

/// A gate that lets nobody in fails the run, however quietly it does it:
/// varco's own 503s (here a closed room's) are refusals, not an
/// in-flight cap's, and a crowd of which nobody reached the portal is a
/// broken promise. The run exited 0 with "0/20 reached the portal".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_that_lets_nobody_in_fails_the_run() {
    let s = SimSettings {
        citizens: 20,
        patience: Duration::from_secs(3),
        ..SimSettings::default()
    };
    let run = through_varco(&s, "mode = \"closed\"", &[]).await.unwrap();
    let with = run.outcome;
    assert_eq!(with.admitted, 0);
    assert!(with.refused >= 20, "{} refusals", with.refused);
    let broken = broken_promises(&with);
    assert!(
        broken.iter().any(|b| b.contains("refusal of its own"))
            && broken.iter().any(|b| b == "nobody reached the portal"),
        "{broken:?}"
    );
}
