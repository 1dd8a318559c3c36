//! The drawing primitives of the pictures: an SVG string with helpers for its elements, axes
//! (linear or logarithmic, with their ticks) and the frame of a chart.
//!
//! Every number written into the SVG goes through [`N`], which writes a non-finite value as 0,
//! so that no data can put `NaN` or `inf` into a coordinate.

use std::fmt::{self, Write as _};

/// A coordinate or length, written with one decimal (0 when not finite).
#[derive(Debug, Clone, Copy)]
pub(super) struct N(pub(super) f64);

impl fmt::Display for N {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = if self.0.is_finite() { self.0 } else { 0.0 };
        // Rounded first, so that -0.04 does not print as -0.0.
        let value = (value * 10.0).round() / 10.0 + 0.0;
        write!(f, "{value:.1}")
    }
}

/// `text` with the characters XML gives a meaning escaped.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// `1234567` as `1,234,567`.
pub(super) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// An SVG document under construction.
#[derive(Debug, Default)]
pub(super) struct Svg {
    out: String,
}

impl Svg {
    /// Appends raw markup.
    pub(super) fn raw(&mut self, markup: &str) {
        self.out.push_str(markup);
    }

    /// A straight line; `style` holds its other attributes (`stroke`, …).
    pub(super) fn line(&mut self, from: (f64, f64), to: (f64, f64), style: &str) {
        let _ = writeln!(
            self.out,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" {style}/>"#,
            N(from.0),
            N(from.1),
            N(to.0),
            N(to.1)
        );
    }

    /// A rectangle from `corner` (top left), `size` wide and high.
    pub(super) fn rect(&mut self, corner: (f64, f64), size: (f64, f64), style: &str) {
        let _ = writeln!(
            self.out,
            r#"<rect x="{}" y="{}" width="{}" height="{}" {style}/>"#,
            N(corner.0),
            N(corner.1),
            N(size.0.max(0.0)),
            N(size.1.max(0.0))
        );
    }

    /// Text at `at`, `attributes` giving its anchor, size, …
    pub(super) fn text(&mut self, at: (f64, f64), attributes: &str, text: &str) {
        let _ = writeln!(
            self.out,
            r#"<text x="{}" y="{}" {attributes}>{}</text>"#,
            N(at.0),
            N(at.1),
            escape(text)
        );
    }

    /// A series: one polyline through `points` (possibly none), in `colour`.
    pub(super) fn polyline(&mut self, points: &[(f64, f64)], colour: &str) {
        let mut list = String::new();
        for (i, (x, y)) in points.iter().enumerate() {
            let _ = write!(list, "{}{},{}", if i > 0 { " " } else { "" }, N(*x), N(*y));
        }
        let _ = writeln!(
            self.out,
            r#"<polyline points="{list}" fill="none" stroke="{colour}" stroke-width="1.8" stroke-linejoin="round"/>"#
        );
    }

    /// A dot of `colour` at `at`.
    pub(super) fn dot(&mut self, at: (f64, f64), colour: &str) {
        let _ = writeln!(
            self.out,
            r#"<circle cx="{}" cy="{}" r="2.2" fill="{colour}"/>"#,
            N(at.0),
            N(at.1)
        );
    }

    /// The markup so far.
    pub(super) fn finish(self) -> String {
        self.out
    }
}

/// How values map onto an axis.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scale {
    /// `low` at one end, `high` at the other.
    Linear { low: f64, high: f64 },
    /// `10^low` to `10^high`, logarithmically.
    Log { low: i32, high: i32 },
}

impl Scale {
    /// Where `value` falls along the axis, 0 to 1 (clamped; 0 for what has no place on it).
    pub(super) fn fraction(self, value: f64) -> f64 {
        let fraction = match self {
            Self::Linear { low, high } => (value - low) / (high - low),
            Self::Log { low, high } => {
                (value.log10() - f64::from(low)) / f64::from(high.saturating_sub(low))
            }
        };
        if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// An axis: its scale, its ticks (value and label; an empty label draws a light grid line
/// only) and its title.
#[derive(Debug, Clone)]
pub(super) struct Axis {
    /// How values map onto it.
    pub(super) scale: Scale,
    /// Grid lines and their labels.
    pub(super) ticks: Vec<(f64, String)>,
    /// What it measures, with the unit.
    pub(super) title: String,
}

/// The step of 1, 2 or 5 times a power of ten nearest `raw` (at least `floor`).
fn nice_step(raw: f64, floor: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return floor;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = match raw / magnitude {
        f if f < 1.5 => magnitude,
        f if f < 3.5 => 2.0 * magnitude,
        f if f < 7.5 => 5.0 * magnitude,
        _ => 10.0 * magnitude,
    };
    step.max(floor)
}

impl Axis {
    /// A linear axis of whole numbers from 0 to a multiple of a round step at or above `high`
    /// (1 when `high` is not above 0), with about `ticks` steps.
    pub(super) fn counts(high: f64, ticks: f64, title: &str) -> Self {
        let high = if high.is_finite() && high > 0.0 {
            high
        } else {
            1.0
        };
        let step = nice_step(high / ticks, 1.0);
        let steps = (high / step).ceil().max(1.0) as u64;
        Self {
            scale: Scale::Linear {
                low: 0.0,
                high: steps as f64 * step,
            },
            ticks: (0..=steps)
                .map(|i| {
                    let value = i as f64 * step;
                    (value, thousands(value as u64))
                })
                .collect(),
            title: title.to_string(),
        }
    }

    /// A logarithmic axis over whole decades covering every positive, finite value of
    /// `values` (0.1 to 10 when there are none), between 0.001 and 10^6; the 2 and 5 of each
    /// decade are labelled when there are at most two decades.
    pub(super) fn decades(values: impl Iterator<Item = f64>, title: &str) -> Self {
        let (min, max) = values
            .filter(|v| v.is_finite() && *v > 0.0)
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        let (mut low, mut high) = if max > 0.0 {
            (min.log10().floor() as i32, max.log10().ceil() as i32)
        } else {
            (-1, 1)
        };
        low = low.clamp(-3, 5);
        high = high.clamp(low + 1, 6);
        let label_minor = high - low <= 2;
        let mut ticks = Vec::new();
        for decade in low..=high {
            let decimals = usize::try_from(-decade).unwrap_or(0);
            for multiple in [1.0, 2.0, 5.0] {
                if multiple > 1.0 && decade == high {
                    break;
                }
                let value = multiple * 10f64.powi(decade);
                let label = if multiple == 1.0 || label_minor {
                    format!("{value:.decimals$}")
                } else {
                    String::new()
                };
                ticks.push((value, label));
            }
        }
        Self {
            scale: Scale::Log { low, high },
            ticks,
            title: title.to_string(),
        }
    }
}

/// The plotting area of a chart, in the picture's coordinates.
#[derive(Debug, Clone, Copy)]
pub(super) struct Area {
    /// Left edge.
    pub(super) left: f64,
    /// Top edge.
    pub(super) top: f64,
    /// Width.
    pub(super) width: f64,
    /// Height.
    pub(super) height: f64,
}

impl Area {
    /// The point at `x` and `y`, each a fraction (0 to 1) of the width and the height, from
    /// the bottom left corner.
    pub(super) fn at(&self, x: f64, y: f64) -> (f64, f64) {
        (
            self.left + x * self.width,
            self.top + (1.0 - y) * self.height,
        )
    }

    /// The point of the values `x` and `y` on these axes.
    pub(super) fn point(&self, x: &Axis, y: &Axis, (vx, vy): (f64, f64)) -> (f64, f64) {
        self.at(x.scale.fraction(vx), y.scale.fraction(vy))
    }
}

/// Draws a chart's title, grid, tick labels, axis titles and frame around `area`.
pub(super) fn frame(svg: &mut Svg, area: Area, title: &str, x: &Axis, y: &Axis) {
    svg.text(
        (area.left, area.top - 30.0),
        r#"font-size="13" font-weight="bold""#,
        title,
    );
    let bottom = area.top + area.height;
    let right = area.left + area.width;
    for (value, label) in &x.ticks {
        let (at, _) = area.at(x.scale.fraction(*value), 0.0);
        svg.line((at, area.top), (at, bottom), &grid(label));
        if !label.is_empty() {
            svg.text((at, bottom + 15.0), r#"text-anchor="middle""#, label);
        }
    }
    for (value, label) in &y.ticks {
        let (_, at) = area.at(0.0, y.scale.fraction(*value));
        svg.line((area.left, at), (right, at), &grid(label));
        if !label.is_empty() {
            svg.text((area.left - 6.0, at + 4.0), r#"text-anchor="end""#, label);
        }
    }
    svg.rect(
        (area.left, area.top),
        (area.width, area.height),
        r##"fill="none" stroke="#666""##,
    );
    svg.text(
        (area.left + area.width / 2.0, bottom + 34.0),
        r#"text-anchor="middle""#,
        &x.title,
    );
    let side = (area.left - 52.0, area.top + area.height / 2.0);
    svg.text(
        side,
        &format!(
            r#"text-anchor="middle" transform="rotate(-90 {} {})""#,
            N(side.0),
            N(side.1)
        ),
        &y.title,
    );
}

/// The style of a grid line: darker where it has a label.
fn grid(label: &str) -> String {
    let colour = if label.is_empty() { "#eee" } else { "#ccc" };
    format!(r#"stroke="{colour}" stroke-width="1""#)
}

/// A row of legend entries above `area`: a short line of each colour and its text.
pub(super) fn legend(svg: &mut Svg, area: Area, entries: &[(&str, String)]) {
    let mut x = area.left;
    let y = area.top - 10.0;
    for (colour, text) in entries {
        svg.line(
            (x, y - 4.0),
            (x + 18.0, y - 4.0),
            &format!(r#"stroke="{colour}" stroke-width="3""#),
        );
        svg.text((x + 23.0, y), "", text);
        // An estimate of the text's width at 12 px: wide enough for digits and letters.
        x += 23.0 + 6.6 * text.chars().count() as f64 + 16.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_with_one_decimal_and_never_as_nan_or_infinity() {
        assert_eq!(N(1.25).to_string(), "1.3");
        assert_eq!(N(-0.04).to_string(), "0.0");
        assert_eq!(N(f64::NAN).to_string(), "0.0");
        assert_eq!(N(f64::INFINITY).to_string(), "0.0");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(escape("a<b>&\"c\""), "a&lt;b&gt;&amp;&quot;c&quot;");
    }

    #[test]
    fn a_log_axis_covers_the_data_in_whole_decades() {
        let axis = Axis::decades([0.5, 30.0, f64::NAN, 0.0, -1.0].into_iter(), "ms");
        assert!(matches!(axis.scale, Scale::Log { low: -1, high: 2 }));
        let labelled: Vec<&str> = axis
            .ticks
            .iter()
            .filter(|t| !t.1.is_empty())
            .map(|t| t.1.as_str())
            .collect();
        assert_eq!(labelled, ["0.1", "1", "10", "100"]);
        assert_eq!(axis.scale.fraction(1.0), 1.0 / 3.0);
        let narrow = Axis::decades([2.0, 3.0].into_iter(), "ms");
        assert!(matches!(narrow.scale, Scale::Log { low: 0, high: 1 }));
        assert_eq!(narrow.ticks.len(), 4, "1, 2, 5, 10: {:?}", narrow.ticks);
        assert_eq!(narrow.ticks[1].1, "2");
        let none = Axis::decades(std::iter::empty(), "ms");
        assert!(matches!(none.scale, Scale::Log { low: -1, high: 1 }));
        assert_eq!(none.scale.fraction(0.0), 0.0);
        assert_eq!(none.scale.fraction(f64::NAN), 0.0);
    }

    #[test]
    fn a_count_axis_ends_on_a_round_number_above_the_data() {
        let axis = Axis::counts(11_000.0, 5.0, "deliveries/s");
        assert!(matches!(axis.scale, Scale::Linear { low: 0.0, high } if high == 12_000.0));
        assert_eq!(axis.ticks.last().map(|t| t.1.as_str()), Some("12,000"));
        let zero = Axis::counts(0.0, 5.0, "deliveries/s");
        assert_eq!(zero.ticks.len(), 2, "0 and 1: {:?}", zero.ticks);
        assert_eq!(zero.scale.fraction(0.0), 0.0);
        let seconds = Axis::counts(13.0, 8.0, "s");
        assert_eq!(seconds.ticks[1].0, 2.0);
        assert_eq!(seconds.scale.fraction(14.0), 1.0);
    }
}
