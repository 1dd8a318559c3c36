//! Tests of the pictures: well-formed SVG whatever the data, lines that follow the data.

use std::path::Path;

use super::*;
use crate::bench::{Percentiles, Verdict};

/// A curve from `low` ms at 0% to 100 × `low` at 99.99%.
fn curve(low: f64) -> Vec<CurvePoint> {
    (0..=80)
        .map(|step| {
            let nines = f64::from(step) / 20.0;
            CurvePoint {
                percentile: (1.0 - 10f64.powf(-nines)) * 100.0,
                ms: low * 10f64.powf(nines / 2.0),
            }
        })
        .collect()
}

fn percentiles(curve: &[CurvePoint]) -> Percentiles {
    Percentiles {
        count: if curve.is_empty() { 0 } else { 1000 },
        p99: curve.get(40).map_or(0.0, |p| p.ms),
        ..Percentiles::default()
    }
}

/// A run's report with these curves and deliveries per second (12 s: 2 of warm-up).
fn report(same: Vec<CurvePoint>, other: Vec<CurvePoint>, per_second: Vec<u64>) -> Report {
    Report {
        scenario: "steady".to_string(),
        target: "in-process".to_string(),
        clusters: 3,
        servers_per_cluster: Some(2),
        bus: Some("local".to_string()),
        storage: Some("file".to_string()),
        users: 1000,
        follows_per_user: 10,
        graph: "uniform".to_string(),
        rate: Some(1000),
        in_flight: None,
        duration_s: 10.0,
        warm_up_s: 2.0,
        posts_per_s: 1000.0,
        deliveries_per_s: 9996.0,
        same_cluster_ms: percentiles(&same),
        cross_cluster_ms: percentiles(&other),
        all_ms: Percentiles::default(),
        exactly_once: Verdict::default(),
        disruption_at_s: None,
        recovery_ms: None,
        peak_memory_bytes: None,
        cpu_s: None,
        cpu_ms_per_post: None,
        ok: true,
        deliveries_per_second: per_second,
        same_cluster_curve: same,
        cross_cluster_curve: other,
    }
}

fn steady() -> Report {
    let mut per_second = vec![10_000; 12];
    per_second[0] = 9_000;
    per_second.push(40);
    report(curve(1.0), curve(3.0), per_second)
}

/// The values of every attribute named `name` (` name="…"`).
fn attributes<'a>(svg: &'a str, name: &str) -> Vec<&'a str> {
    let key = format!(" {name}=\"");
    svg.match_indices(&key)
        .filter_map(|(at, _)| {
            let rest = &svg[at + key.len()..];
            rest.find('"').map(|end| &rest[..end])
        })
        .collect()
}

/// The points of every polyline, in order.
fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
    attributes(svg, "points")
        .into_iter()
        .map(|list| {
            list.split_whitespace()
                .map(|pair| {
                    let (x, y) = pair.split_once(',').expect("x,y");
                    (x.parse().expect("x"), y.parse().expect("y"))
                })
                .collect()
        })
        .collect()
}

/// Starts with `<svg`, ends with `</svg>`, every element closed in order, and every
/// number of every coordinate attribute finite.
fn assert_well_formed(svg: &str) {
    assert!(svg.starts_with("<svg "), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
    let mut open = Vec::new();
    for tag in svg.split('<').skip(1) {
        let tag = &tag[..tag.find('>').expect("a tag ends")];
        let name = tag.split_whitespace().next().expect("a tag has a name");
        if let Some(closing) = name.strip_prefix('/') {
            assert_eq!(open.pop(), Some(closing), "{svg}");
        } else if !tag.ends_with('/') {
            open.push(name);
        }
    }
    assert!(open.is_empty(), "unclosed {open:?}");
    for name in [
        "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "width", "height", "points",
    ] {
        for value in attributes(svg, name) {
            for number in value.split([' ', ',']).filter(|n| !n.is_empty()) {
                let parsed: f64 = number.parse().unwrap_or(f64::NAN);
                assert!(parsed.is_finite(), "{name}=\"{value}\"");
            }
        }
    }
}

#[test]
fn a_run_is_drawn_with_one_line_per_series_its_legends_and_its_settings() {
    let svg = svg(&[steady()]);
    assert_well_formed(&svg);
    assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
    let lines = polylines(&svg);
    assert_eq!(lines[0].len(), 81);
    assert_eq!(lines[1].len(), 81);
    assert_eq!(lines[2].len(), 13, "one point per second");
    for text in [
        "same cluster: p99 10.00 ms",
        "other cluster: p99 30.00 ms",
        "3 clusters × 2 servers, bus local, storage file",
        "1,000 users × 10 follows (uniform); 1,000 posts/s for 10 s after 2 s of warm-up",
        "measured: 1,000 posts/s, 9,996 deliveries/s in the timed window; exactly once: yes",
        "timed window: 9,996/s",
        "latency (ms)",
        "percentile",
        "99.99%",
        "deliveries/s",
        "seconds since posting began",
    ] {
        assert!(svg.contains(text), "no {text:?} in {svg}");
    }
}

#[test]
fn the_lines_follow_the_data() {
    let svg = svg(&[steady()]);
    let lines = polylines(&svg);
    let (same, other, deliveries) = (&lines[0], &lines[1], &lines[2]);
    // Percentiles left to right, evenly spaced in nines; slower is higher (a smaller y).
    assert!(same.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 > w[1].1));
    let step = same[20].0 - same[0].0;
    assert!((same[40].0 - same[20].0 - step).abs() < 0.2, "{same:?}");
    // Three times slower: above at every percentile, by the same height (log scale).
    let gap = same[0].1 - other[0].1;
    assert!(gap > 10.0, "{gap}");
    assert!(
        same.iter()
            .zip(other)
            .all(|(s, o)| (s.1 - o.1 - gap).abs() < 0.2)
    );
    // One second apart; the full seconds level, the first lower, the drain's near zero.
    assert!(deliveries.windows(2).all(|w| w[1].0 > w[0].0));
    assert!(deliveries[1..12].iter().all(|p| p.1 == deliveries[1].1));
    assert!(deliveries[0].1 > deliveries[1].1);
    assert!(deliveries[12].1 > deliveries[0].1);
    // The timed window is shaded from 2 s to 12 s.
    let shade = svg.find("fill=\"#fdf3d8\"").expect("a shaded window");
    let rect = &svg[svg[..shade].rfind("<rect").expect("a rectangle")..shade];
    let number = |name: &str| -> f64 { attributes(rect, name)[0].parse().expect("a number") };
    let second = (deliveries[1].0 - deliveries[0].0).abs();
    assert!(
        (number("x") - (deliveries[2].0 - second / 2.0)).abs() < 0.2,
        "{rect}"
    );
    assert!((number("width") - 10.0 * second).abs() < 0.2, "{rect}");
}

#[test]
fn empty_series_zero_deliveries_and_single_points_draw_without_nan() {
    let single = vec![CurvePoint {
        percentile: 0.0,
        ms: 0.0,
    }];
    for report in [
        report(Vec::new(), Vec::new(), Vec::new()),
        report(Vec::new(), Vec::new(), vec![0, 0, 0]),
        report(single.clone(), curve(0.0), vec![7]),
        report(curve(f64::NAN), curve(f64::INFINITY), vec![u64::MAX]),
    ] {
        let svg = svg(&[report]);
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
    }
    let empty = svg(&[report(Vec::new(), curve(2.0), Vec::new())]);
    assert!(empty.contains("same cluster: no deliveries"), "{empty}");
    assert!(empty.contains("other cluster: p99 20.00 ms"), "{empty}");
}

#[test]
fn several_runs_are_stacked_one_under_the_other() {
    let mut second = steady();
    second.disruption_at_s = Some(5.3);
    second.recovery_ms = Some(727.4);
    second.ok = false;
    second.exactly_once.missing = 3;
    let svg = svg(&[steady(), second]);
    assert_well_formed(&svg);
    assert_eq!(svg.matches("<polyline").count(), 6);
    assert!(
        svg.contains("Run 1 of 2") && svg.contains("Run 2 of 2"),
        "{svg}"
    );
    assert!(svg.contains(">disruption</text>"), "{svg}");
    assert!(
        svg.contains("exactly once: NO (0 of 0 deliveries, 3 missing, 0 duplicate")
            && svg.contains("disruption at 5.3 s, recovered after 727 ms"),
        "{svg}"
    );
    assert!(svg.contains(&format!("height=\"{}\"", N(2.0 * RUN_HEIGHT))));
    let lines = polylines(&svg);
    assert!(lines[3][0].1 > lines[0][0].1 + CHART_HEIGHT, "{lines:?}");
}

#[test]
fn text_from_the_run_is_escaped() {
    let mut odd = steady();
    odd.target = "<host>&\"port\"".to_string();
    let svg = svg(&[odd]);
    assert_well_formed(&svg);
    assert!(svg.contains("&lt;host&gt;&amp;&quot;port&quot;"), "{svg}");
}

#[test]
fn the_html_page_carries_the_same_svg_inline() {
    let reports = [steady()];
    let page = html(&reports);
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert!(page.contains(&svg(&reports)), "{page}");
    assert!(page.trim_end().ends_with("</html>"));
    assert!(!page.contains("src=") && !page.contains("<link"), "{page}");
}

#[test]
fn only_svg_and_html_files_are_accepted() {
    assert_eq!(Format::of(Path::new("a/run.svg")), Ok(Format::Svg));
    assert_eq!(Format::of(Path::new("RUN.SVG")), Ok(Format::Svg));
    assert_eq!(Format::of(Path::new("run.html")), Ok(Format::Html));
    for refused in ["run.png", "run.htm", "run", "svg", "run.svg.txt", ""] {
        assert_eq!(
            Format::of(Path::new(refused)),
            Err(EXTENSION_ERROR.to_string()),
            "{refused}"
        );
        assert_eq!(check(Path::new(refused)), Err(EXTENSION_ERROR.to_string()));
    }
    assert_eq!(EXTENSION_ERROR, "--report: FILE must end in .svg or .html");
    assert_eq!(check(Path::new("run.svg")), Ok(()));
    let missing = check(Path::new("/no/such/directory/run.svg"));
    assert!(
        missing
            .as_ref()
            .is_err_and(|e| e.contains("/no/such/directory")),
        "{missing:?}"
    );
}

#[test]
fn the_picture_is_written_in_the_format_of_the_extension() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let reports = [steady()];
    let svg_path = dir.path().join("run.svg");
    write(&svg_path, &reports).expect("written");
    let written = std::fs::read_to_string(&svg_path).expect("readable");
    assert_eq!(written, svg(&reports));
    let html_path = dir.path().join("run.html");
    write(&html_path, &reports).expect("written");
    let written = std::fs::read_to_string(&html_path).expect("readable");
    assert_eq!(written, html(&reports));
    // A directory where the file should go.
    let taken = dir.path().join("taken.svg");
    std::fs::create_dir(&taken).expect("a directory");
    let failed = write(&taken, &reports);
    assert!(
        failed
            .as_ref()
            .is_err_and(|e| e.starts_with("--report: cannot write") && e.contains("taken.svg")),
        "{failed:?}"
    );
}
