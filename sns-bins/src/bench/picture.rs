//! `sns bench --report FILE`: pictures of the runs, an SVG written by hand, or an HTML page
//! with the same SVG inline (no external assets).
//!
//! Each run gets a title (its settings and what it measured) and two charts side by side,
//! runs stacked one under the other:
//!
//! - latency against percentile, one line per path (same cluster, other cluster), for the
//!   posts due in the timed window: latency in milliseconds on a logarithmic y axis, the
//!   percentile on an x axis spaced like HdrHistogram's percentile plots (`-log10(1 - p)`, so
//!   90%, 99%, 99.9% and 99.99% are evenly spaced); the legend gives each path's p99;
//! - deliveries in each second of the run, warm-up and drain included, with the timed window
//!   shaded (and the scenario's disruption marked).

mod canvas;

use std::path::Path;

use canvas::{Area, Axis, N, Svg, frame, legend, thousands};

use super::latency::{CURVE_NINES, CurvePoint};
use super::report::Report;

/// The picture's width.
const WIDTH: f64 = 1000.0;
/// Height of a run's title.
const TITLE_HEIGHT: f64 = 68.0;
/// Height of a run's charts, their titles, legends and axes included.
const CHART_HEIGHT: f64 = 340.0;
/// Height of one run: title, charts and the space under them.
const RUN_HEIGHT: f64 = TITLE_HEIGHT + CHART_HEIGHT + 16.0;
/// Margins of a chart's plotting area inside its half of the picture.
const MARGIN: (f64, f64, f64, f64) = (78.0, 20.0, 46.0, 46.0); // left, right, top, bottom
/// Colours of the series.
const SAME_COLOUR: &str = "#1f77b4";
const OTHER_COLOUR: &str = "#d62728";
const DELIVERIES_COLOUR: &str = "#2ca02c";
const DISRUPTION_COLOUR: &str = "#9467bd";

/// The message for a `--report` file that is neither `.svg` nor `.html`.
pub const EXTENSION_ERROR: &str = "--report: FILE must end in .svg or .html";

/// What `--report` writes, by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An SVG picture.
    Svg,
    /// An HTML page with the SVG picture inline.
    Html,
}

impl Format {
    /// The format `path` asks for by its extension (`.svg` or `.html`, in any case).
    pub fn of(path: &Path) -> Result<Self, String> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("svg") => Ok(Self::Svg),
            Some("html") => Ok(Self::Html),
            _ => Err(EXTENSION_ERROR.to_string()),
        }
    }
}

/// Refuses, before a run, a `--report` file the picture could not go to: one with another
/// extension, or in a directory that does not exist.
pub fn check(path: &Path) -> Result<(), String> {
    Format::of(path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(format!(
            "--report: directory {} does not exist",
            dir.display()
        )),
        _ => Ok(()),
    }
}

/// Writes the picture of `reports` to `path`, in the format its extension names.
pub fn write(path: &Path, reports: &[Report]) -> Result<(), String> {
    let body = match Format::of(path)? {
        Format::Svg => svg(reports),
        Format::Html => html(reports),
    };
    std::fs::write(path, body)
        .map_err(|e| format!("--report: cannot write {}: {e}", path.display()))
}

/// An HTML page showing the picture of `reports`, inline.
pub fn html(reports: &[Report]) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>sns bench</title>\n</head>\n<body style=\"margin:0;background:#fff\">\n{}</body>\n</html>\n",
        svg(reports)
    )
}

/// The picture of `reports`: each run's title and charts, one run under the other.
pub fn svg(reports: &[Report]) -> String {
    let height = RUN_HEIGHT * reports.len().max(1) as f64;
    let mut svg = Svg::default();
    svg.raw(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\" fill=\"#222\">\n",
        w = N(WIDTH),
        h = N(height)
    ));
    svg.rect((0.0, 0.0), (WIDTH, height), r##"fill="#fff""##);
    for (index, report) in reports.iter().enumerate() {
        let top = RUN_HEIGHT * index as f64;
        title(&mut svg, top, report, (index + 1, reports.len()));
        let charts = top + TITLE_HEIGHT;
        latency_chart(&mut svg, plot_area(0.0, charts), report);
        deliveries_chart(&mut svg, plot_area(WIDTH / 2.0, charts), report);
    }
    svg.raw("</svg>\n");
    svg.finish()
}

/// The plotting area of the chart whose half of the picture starts at `left`, `top`.
fn plot_area(left: f64, top: f64) -> Area {
    let (margin_left, margin_right, margin_top, margin_bottom) = MARGIN;
    Area {
        left: left + margin_left,
        top: top + margin_top,
        width: WIDTH / 2.0 - margin_left - margin_right,
        height: CHART_HEIGHT - margin_top - margin_bottom,
    }
}

/// `12 s`, `0.5 s`.
fn seconds(s: f64) -> String {
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// A run's title: which run and its deployment, then its population and load, then what it
/// measured.
fn title(svg: &mut Svg, top: f64, report: &Report, (run, runs): (usize, usize)) {
    let which = if runs > 1 {
        format!("Run {run} of {runs}")
    } else {
        "sns bench".to_string()
    };
    let clusters = match report.clusters {
        1 => "1 cluster".to_string(),
        n => format!("{n} clusters"),
    };
    let deployment = match (report.servers_per_cluster, &report.bus, &report.storage) {
        (Some(servers), Some(bus), Some(storage)) => {
            format!("{clusters} × {servers} servers, bus {bus}, storage {storage}")
        }
        _ => clusters,
    };
    let rate = match (report.rate, report.in_flight) {
        (Some(r), _) => format!("{} posts/s", thousands(u64::from(r))),
        (None, Some(n)) => format!(
            "as fast as possible, at most {} posts on their way",
            thousands(u64::from(n))
        ),
        (None, None) => "as fast as possible".to_string(),
    };
    let load = format!(
        "{} users × {} follows ({}); {rate} for {} after {} of warm-up",
        thousands(u64::from(report.users)),
        report.follows_per_user,
        report.graph,
        seconds(report.duration_s),
        seconds(report.warm_up_s),
    );
    svg.text(
        (16.0, top + 22.0),
        r#"font-size="15" font-weight="bold""#,
        &format!(
            "{which}: {}, {}: {deployment}",
            report.scenario, report.target
        ),
    );
    svg.text((16.0, top + 41.0), "", &load);
    svg.text((16.0, top + 58.0), "", &measured(report));
}

/// What a run measured, for its title: throughput, exactly once, the disruption's recovery.
fn measured(report: &Report) -> String {
    let v = &report.exactly_once;
    let mut text = format!(
        "measured: {} posts/s, {} deliveries/s in the timed window; exactly once: {} ({} of {} \
         deliveries",
        thousands(report.posts_per_s.round() as u64),
        thousands(report.deliveries_per_s.round() as u64),
        if report.ok { "yes" } else { "NO" },
        thousands(v.delivered),
        thousands(v.expected),
    );
    if !report.ok {
        text.push_str(&format!(
            ", {} missing, {} duplicate, {} unexpected",
            thousands(v.missing),
            thousands(v.duplicates),
            thousands(v.unexpected)
        ));
    }
    text.push(')');
    if let Some(at) = report.disruption_at_s {
        let recovered = report
            .recovery_ms
            .map_or("never recovered".to_string(), |ms| {
                format!("recovered after {ms:.0} ms")
            });
        text.push_str(&format!("; disruption at {at:.1} s, {recovered}"));
    }
    text
}

/// Where percentile `p` (0 to 100) falls on the x axis: `-log10(1 - p/100)`, at most the
/// curve's last nine.
fn nines(p: f64) -> f64 {
    let cap = f64::from(CURVE_NINES);
    let rest = (1.0 - p / 100.0).max(10f64.powf(-cap));
    (-rest.log10()).clamp(0.0, cap)
}

/// The percentile x axis: 0%, 50%, 90%, 99%, 99.9%, 99.99% (as far as the curves go).
fn percentile_axis() -> Axis {
    let ticks = [
        (0.0, "0%"),
        (nines(50.0), "50%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
    ];
    Axis {
        scale: canvas::Scale::Linear {
            low: 0.0,
            high: f64::from(CURVE_NINES),
        },
        ticks: ticks
            .into_iter()
            .filter(|(at, _)| *at <= f64::from(CURVE_NINES))
            .map(|(at, label)| (at, label.to_string()))
            .collect(),
        title: "percentile".to_string(),
    }
}

/// Latency against percentile, one line per path, the legend giving each path's p99.
fn latency_chart(svg: &mut Svg, area: Area, report: &Report) {
    let paths: [(&str, &str, &[CurvePoint], f64, u64); 2] = [
        (
            "same cluster",
            SAME_COLOUR,
            &report.same_cluster_curve,
            report.same_cluster_ms.p99,
            report.same_cluster_ms.count,
        ),
        (
            "other cluster",
            OTHER_COLOUR,
            &report.cross_cluster_curve,
            report.cross_cluster_ms.p99,
            report.cross_cluster_ms.count,
        ),
    ];
    let x = percentile_axis();
    let y = Axis::decades(
        paths.iter().flat_map(|p| p.2.iter().map(|point| point.ms)),
        "latency (ms)",
    );
    frame(
        svg,
        area,
        "Latency by path, posts due in the timed window",
        &x,
        &y,
    );
    let mut entries = Vec::new();
    for (name, colour, curve, p99, count) in paths {
        let points: Vec<(f64, f64)> = curve
            .iter()
            .map(|p| area.point(&x, &y, (nines(p.percentile), p.ms)))
            .collect();
        svg.polyline(&points, colour);
        let text = if count == 0 || curve.is_empty() {
            format!("{name}: no deliveries")
        } else {
            format!("{name}: p99 {p99:.2} ms")
        };
        entries.push((colour, text));
    }
    legend(svg, area, &entries);
}

/// Deliveries in each second of the run, the timed window shaded, the disruption marked.
fn deliveries_chart(svg: &mut Svg, area: Area, report: &Report) {
    let series = &report.deliveries_per_second;
    let window = (report.warm_up_s, report.warm_up_s + report.duration_s);
    let span = (series.len() as f64).max(window.1).max(1.0);
    let x = Axis::counts(span, 8.0, "seconds since posting began");
    let top = series.iter().copied().max().unwrap_or(0) as f64;
    // Headroom, so that a steady rate does not run along the frame.
    let y = Axis::counts(top * 1.1, 5.0, "deliveries/s");
    let (from, _) = area.point(&x, &y, (window.0, 0.0));
    let (to, _) = area.point(&x, &y, (window.1, 0.0));
    svg.rect(
        (from, area.top),
        (to - from, area.height),
        r##"fill="#fdf3d8""##,
    );
    frame(
        svg,
        area,
        "Deliveries per second, warm-up and drain included",
        &x,
        &y,
    );
    svg.text(
        ((from + to) / 2.0, area.top + 14.0),
        r##"text-anchor="middle" fill="#9a6b00""##,
        "timed window",
    );
    if let Some(at) = report.disruption_at_s {
        let (at, _) = area.point(&x, &y, (at, 0.0));
        svg.line(
            (at, area.top),
            (at, area.top + area.height),
            &format!(r#"stroke="{DISRUPTION_COLOUR}" stroke-width="1.5" stroke-dasharray="5 3""#),
        );
        svg.text(
            (at + 4.0, area.top + 30.0),
            &format!(r#"fill="{DISRUPTION_COLOUR}""#),
            "disruption",
        );
    }
    let points: Vec<(f64, f64)> = series
        .iter()
        .enumerate()
        .map(|(second, n)| area.point(&x, &y, (second as f64 + 0.5, *n as f64)))
        .collect();
    svg.polyline(&points, DELIVERIES_COLOUR);
    for point in &points {
        svg.dot(*point, DELIVERIES_COLOUR);
    }
    let text = format!(
        "deliveries in each second (timed window: {}/s)",
        thousands(report.deliveries_per_s.round() as u64)
    );
    legend(svg, area, &[(DELIVERIES_COLOUR, text)]);
}

#[cfg(test)]
mod tests;
