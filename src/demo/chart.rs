//! A self-contained SVG line chart of simulation runs: the admission rate
//! in force and the portal's p90 latency, second by second. Hand-written
//! rather than plotters: two panels of polylines need no font rasteriser
//! or backend, and the file opens in any browser.

use std::fmt::Write;

use super::simulate::Run;

const WIDTH: f64 = 900.0;
const PANEL: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;
const COLOURS: &[&str] = &["#c0392b", "#7f8c8d", "#1f6fd1", "#27ae60", "#8e44ad"];

struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    value: &'a dyn Fn(&super::simulate::Sample) -> Option<f64>,
    /// A horizontal reference line (the knee, the target).
    reference: Option<(f64, &'a str)>,
}

/// Rate (new sessions/min) and p90 portal latency (ms) over time, one
/// line per run.
pub fn svg(title: &str, runs: &[(String, Run)], knee: f64, target_ms: f64) -> String {
    let rate = |s: &super::simulate::Sample| s.rate_per_minute;
    let latency = |s: &super::simulate::Sample| s.p90_latency.map(|l| l * 1000.0);
    let panels = [
        Panel {
            title: "admission rate in force",
            unit: "/min",
            value: &rate,
            reference: Some((knee, "portal knee")),
        },
        Panel {
            title: "portal p90 latency",
            unit: "ms",
            value: &latency,
            reference: Some((target_ms, "target")),
        },
    ];
    let height = TOP + panels.len() as f64 * (PANEL + GAP);
    let t_max = runs
        .iter()
        .map(|(_, r)| r.seconds)
        .fold(1.0_f64, f64::max)
        .ceil();
    let plot_w = WIDTH - LEFT - RIGHT;
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        crate::page::escape(title)
    );
    for (p, panel) in panels.iter().enumerate() {
        let y0 = TOP + p as f64 * (PANEL + GAP) + 20.0;
        let v_max = runs
            .iter()
            .flat_map(|(_, r)| r.timeline.iter().filter_map(panel.value))
            .chain(panel.reference.map(|(v, _)| v))
            .fold(1.0_f64, f64::max)
            * 1.1;
        let x = |t: f64| LEFT + t / t_max * plot_w;
        let y = |v: f64| y0 + PANEL - (v / v_max).min(1.0) * PANEL;
        let _ = writeln!(
            out,
            "<text x=\"{LEFT}\" y=\"{}\" font-weight=\"bold\">{} ({})</text>\n\
             <rect x=\"{LEFT}\" y=\"{y0}\" width=\"{plot_w}\" height=\"{PANEL}\" fill=\"none\" stroke=\"#999\"/>",
            y0 - 6.0,
            panel.title,
            panel.unit
        );
        for i in 0..=4 {
            let v = v_max * i as f64 / 4.0;
            let _ = writeln!(
                out,
                "<text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{v:.0}</text>\
                 <line x1=\"{LEFT}\" x2=\"{x2}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"#eee\"/>",
                tx = LEFT - 6.0,
                ty = y(v) + 4.0,
                x2 = LEFT + plot_w,
                ly = y(v),
            );
        }
        let step = if t_max > 120.0 { 30.0 } else { 10.0 };
        let mut t = 0.0;
        while t <= t_max {
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{t:.0} s</text>",
                x(t),
                y0 + PANEL + 16.0
            );
            t += step;
        }
        if let Some((v, label)) = panel.reference {
            let _ = writeln!(
                out,
                "<line x1=\"{LEFT}\" x2=\"{x2}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"#000\" stroke-dasharray=\"6 4\"/>\
                 <text x=\"{tx}\" y=\"{ty}\">{label} {v:.0}</text>",
                x2 = LEFT + plot_w,
                ly = y(v),
                tx = LEFT + plot_w + 8.0,
                ty = y(v) + 4.0,
            );
        }
        for (i, (label, run)) in runs.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<String> = run
                .timeline
                .iter()
                .filter_map(|s| (panel.value)(s).map(|v| format!("{:.1},{:.1}", x(s.t), y(v))))
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\
                 <text x=\"{}\" y=\"{}\" fill=\"{colour}\">{}</text>",
                points.join(" "),
                LEFT + plot_w + 8.0,
                y0 + 30.0 + 16.0 * i as f64,
                crate::page::escape(label)
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::super::simulate::Sample;
    use super::*;

    #[test]
    fn draws_one_line_per_run_and_the_references() {
        let run = |rate: f64| Run {
            timeline: (1..=5)
                .map(|t| Sample {
                    t: t as f64,
                    rate_per_minute: Some(rate),
                    p90_latency: Some(0.2),
                    ..Sample::default()
                })
                .collect(),
            seconds: 5.0,
            ..Run::default()
        };
        let svg = svg(
            "t <&>",
            &[("a".into(), run(100.0)), ("b".into(), run(300.0))],
            800.0,
            600.0,
        );
        assert_eq!(svg.matches("<polyline").count(), 4, "2 runs x 2 panels");
        assert!(svg.contains("portal knee 800") && svg.contains("target 600"));
        assert!(svg.contains("t &lt;&amp;&gt;"), "title escaped");
    }
}
