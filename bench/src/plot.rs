//! SVG plots of latency distributions.
//!
//! [`latency_cdf_svg`] draws the empirical CDF of one or more named series of
//! latencies (in milliseconds) on a log10 x axis, so that series that differ by
//! orders of magnitude (5 ms clones next to 35 s cold boots) fit on one chart.
//! The SVG is self-contained text (no font files are read); it is written to a
//! temporary file next to the target and renamed into place, so readers never
//! see a half-written plot.

use std::io;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

/// Width and height of the plot, in SVG pixels.
const SIZE: (u32, u32) = (900, 500);

/// Legend text font.
const LEGEND_FONT: (&str, u32) = ("sans-serif", 14);
/// Padding inside the legend box, in pixels.
const LEGEND_MARGIN: u32 = 10;
/// Width reserved for each legend entry's colour swatch, in pixels.
const LEGEND_SWATCH: u32 = 30;
/// Radius of the dot drawn for a single-sample series, in pixels.
const POINT_RADIUS: u32 = 4;

/// Series colours (Tableau 10), reused in order when there are more series.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One named series of samples in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Latencies in milliseconds; non-finite and non-positive values are
    /// ignored (they have no place on a log scale).
    pub samples_ms: Vec<f64>,
}

/// Errors drawing the plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No series were given.
    #[error("nothing to plot: no series")]
    NoSeries,
    /// No series has a finite, positive sample.
    #[error("nothing to plot: no finite positive samples in any series")]
    NoSamples,
    /// plotters failed to lay out or draw the chart.
    #[error("drawing the plot: {0}")]
    Draw(String),
    /// The SVG could not be written.
    #[error("writing plot {path}: {source}")]
    Write {
        /// The file being written (the target, or its temporary sibling).
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Draws the empirical CDF of each series and writes it as an SVG to `path`.
///
/// x is the latency in ms on a log10 scale, spanning all samples and widened
/// to whole decades; y is the fraction of the series' samples at or below x.
/// Each series gets its own colour and a legend entry `name (n=COUNT)`; a
/// series with a single sample is drawn as a point, and a series with no
/// usable samples (see [`Series::samples_ms`]) is left out of the chart.
///
/// The SVG is written to a temporary file in the same directory as `path`
/// and renamed over it.
pub fn latency_cdf_svg(path: &Path, title: &str, series: &[Series]) -> Result<(), PlotError> {
    let svg = render_cdf(title, series)?;
    write_atomically(path, svg.as_bytes())
}

/// Renders the CDF plot to an SVG string.
fn render_cdf(title: &str, series: &[Series]) -> Result<String, PlotError> {
    if series.is_empty() {
        return Err(PlotError::NoSeries);
    }
    let sorted: Vec<(&str, Vec<f64>)> = series
        .iter()
        .map(|s| {
            let mut v: Vec<f64> = s
                .samples_ms
                .iter()
                .copied()
                .filter(|x| x.is_finite() && *x > 0.0)
                .collect();
            v.sort_by(f64::total_cmp);
            (s.name.as_str(), v)
        })
        .filter(|(_, v)| !v.is_empty())
        .collect();
    if sorted.is_empty() {
        return Err(PlotError::NoSamples);
    }
    let min = sorted
        .iter()
        .map(|(_, v)| v[0])
        .fold(f64::INFINITY, f64::min);
    let max = sorted
        .iter()
        .map(|(_, v)| v[v.len() - 1])
        .fold(f64::NEG_INFINITY, f64::max);
    let decades = decade_range(min, max);

    let mut svg = String::new();
    draw_cdf(&mut svg, title, &sorted, decades).map_err(|e| PlotError::Draw(e.to_string()))?;
    Ok(svg)
}

/// Draws the chart into `svg`. `sorted` holds each series' usable samples in
/// ascending order (never empty); the x axis spans `10^lo..10^hi` ms for
/// `(lo, hi) = decades`.
fn draw_cdf(
    svg: &mut String,
    title: &str,
    sorted: &[(&str, Vec<f64>)],
    decades: (i32, i32),
) -> Result<(), Box<dyn std::error::Error>> {
    let (lo, hi) = decades;
    let (labelled, grid) = x_ticks(lo, hi);
    let x_axis = (pow10(1, lo)..pow10(1, hi))
        .log_scale()
        .with_key_points(labelled)
        .with_light_points(grid);

    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;

    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(x_axis, 0.0..1.02)?;

    chart
        .configure_mesh()
        .x_desc("latency (log scale)")
        .y_desc("fraction of samples ≤ latency")
        .x_label_formatter(&|v| format_ms(*v))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .y_max_light_lines(0)
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;

    // Each series' curve in backend pixels, for placing the legend.
    let mut curves: Vec<Vec<(i32, i32)>> = Vec::with_capacity(sorted.len());
    let mut labels: Vec<String> = Vec::with_capacity(sorted.len());
    for (i, (name, samples)) in sorted.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let label = format!("{name} (n={})", samples.len());
        let points: Vec<(f64, f64)> = if samples.len() == 1 {
            vec![(samples[0], 1.0)]
        } else {
            // Step function: at each sample the CDF jumps from k/n to (k+1)/n.
            let n = samples.len() as f64;
            samples
                .iter()
                .enumerate()
                .flat_map(|(k, &x)| [(x, k as f64 / n), (x, (k as f64 + 1.0) / n)])
                .collect()
        };
        curves.push(points.iter().map(|p| chart.backend_coord(p)).collect());
        let annotation = if points.len() == 1 {
            chart.draw_series(PointSeries::of_element(
                points,
                POINT_RADIUS,
                colour.filled(),
                &|c, s, st| Circle::new(c, s, st),
            ))?
        } else {
            chart.draw_series(LineSeries::new(points, colour.stroke_width(2)))?
        };
        annotation.label(label.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
        });
        labels.push(label);
    }

    let area = chart.plotting_area();
    let position = legend_position(&labels, area.get_base_pixel(), area.dim_in_pixel(), &curves)?;
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(LEGEND_FONT)
        .margin(LEGEND_MARGIN)
        .legend_area_size(LEGEND_SWATCH)
        .draw()?;

    root.present()?;
    Ok(())
}

/// Picks where the legend goes: the first of the corners (then the edge
/// middles, then the centre) where the legend box crosses no curve, or else
/// the one it crosses least. `base` and `dim` are the plotting area's top-left
/// corner and size in pixels; `curves` are the series' polylines in pixels.
fn legend_position(
    labels: &[String],
    base: (i32, i32),
    dim: (u32, u32),
    curves: &[Vec<(i32, i32)>],
) -> Result<SeriesLabelPosition, Box<dyn std::error::Error>> {
    use SeriesLabelPosition::*;
    // Size the box as plotters' SeriesLabelStyle::draw does.
    let mut text = MultiLineText::<(i32, i32), &str>::new((0, 0), LEGEND_FONT);
    for label in labels {
        text.push_line(label.as_str());
    }
    let (text_w, text_h) = text.estimate_dimension()?;
    let margin = LEGEND_MARGIN as i32;
    let (w, h) = (
        text_w + LEGEND_SWATCH as i32 + 2 * margin,
        text_h + 2 * margin,
    );
    let (area_w, area_h) = (dim.0 as i32, dim.1 as i32);

    // Column 0/1/2 = left/middle/right, row 0/1/2 = upper/middle/lower.
    let candidates = [
        (LowerRight, 2, 2),
        (UpperLeft, 0, 0),
        (UpperRight, 2, 0),
        (LowerLeft, 0, 2),
        (UpperMiddle, 1, 0),
        (LowerMiddle, 1, 2),
        (MiddleRight, 2, 1),
        (MiddleLeft, 0, 1),
        (MiddleMiddle, 1, 1),
    ];
    let place = |col: i32, extent: i32, size: i32| match col {
        0 => 5,
        1 => (extent - size) / 2,
        _ => extent - size - 5,
    };
    let crossings = |col: i32, row: i32| -> usize {
        let pad = POINT_RADIUS as i32 + 2;
        let x0 = base.0 + place(col, area_w, w) - pad;
        let y0 = base.1 + place(row, area_h, h) - pad;
        let (x1, y1) = (x0 + w + 2 * pad, y0 + h + 2 * pad);
        // The curves are axis-aligned steps (or single points), so a segment
        // crosses the box exactly when its bounding box overlaps it.
        let hits = |a: (i32, i32), b: (i32, i32)| {
            a.0.min(b.0) <= x1 && a.0.max(b.0) >= x0 && a.1.min(b.1) <= y1 && a.1.max(b.1) >= y0
        };
        curves
            .iter()
            .map(|c| match c.as_slice() {
                [p] => usize::from(hits(*p, *p)),
                c => c.windows(2).filter(|s| hits(s[0], s[1])).count(),
            })
            .sum()
    };
    let (best, _, _) = candidates
        .into_iter()
        .min_by_key(|&(_, col, row)| crossings(col, row))
        .expect("candidates is not empty");
    Ok(best)
}

/// x-axis bounds, as powers of ten, for samples in `min..=max` (both finite
/// and > 0): whole decades, widened by one when a sample sits within ~5% of
/// a decade boundary.
fn decade_range(min: f64, max: f64) -> (i32, i32) {
    const MARGIN: f64 = 0.02; // in decades: 10^0.02 ≈ 1.047
    let lo = (min.log10() - MARGIN).floor();
    let hi = (max.log10() + MARGIN).ceil();
    // Positive finite f64s lie within 10^-324..10^309, so these fit.
    (lo as i32, hi as i32)
}

/// `m * 10^k`, correctly rounded (`powi` is not, for negative `k`).
fn pow10(m: u32, k: i32) -> f64 {
    format!("{m}e{k}").parse().expect("a valid float literal")
}

/// x ticks for the axis `10^lo..10^hi`: the labelled ones (every decade, and
/// 2x and 5x too when the axis spans at most two decades, so that short axes
/// still get a few labels) and faint grid lines at the other multiples.
fn x_ticks(lo: i32, hi: i32) -> (Vec<f64>, Vec<f64>) {
    let labelled_multiples: &[u32] = if hi - lo <= 2 { &[1, 2, 5] } else { &[1] };
    let (mut labelled, mut grid) = (vec![pow10(1, hi)], vec![]);
    for k in lo..hi {
        for m in 1..=9 {
            if labelled_multiples.contains(&m) {
                labelled.push(pow10(m, k));
            } else {
                grid.push(pow10(m, k));
            }
        }
    }
    labelled.sort_by(f64::total_cmp);
    (labelled, grid)
}

/// Formats a tick value in milliseconds as µs, ms or s, whichever keeps the
/// number between 1 and 1000 (e.g. `0.1` → "100 µs", `5000` → "5 s").
fn format_ms(ms: f64) -> String {
    // Round to 3 significant-ish decimals so 1e-1 * 1000 prints as 100.
    let short = |x: f64| format!("{}", (x * 1000.0).round() / 1000.0);
    if ms >= 1000.0 {
        format!("{} s", short(ms / 1000.0))
    } else if ms >= 1.0 {
        format!("{} ms", short(ms))
    } else {
        format!("{} µs", short(ms * 1000.0))
    }
}

/// Writes `bytes` to a temporary file next to `path`, then renames it over
/// `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), PlotError> {
    let write_err = |p: &Path, source| PlotError::Write {
        path: p.to_path_buf(),
        source,
    };
    let Some(file_name) = path.file_name() else {
        return Err(write_err(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
        ));
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);

    std::fs::write(&tmp, bytes).map_err(|e| write_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write_err(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let dir = std::env::temp_dir().join(format!(
                "zygote-plot-{tag}-{}-{}-{nanos}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn series(name: &str, samples_ms: &[f64]) -> Series {
        Series {
            name: name.to_string(),
            samples_ms: samples_ms.to_vec(),
        }
    }

    #[test]
    fn plot_cdf_of_two_series() {
        let dir = TempDir::new("two");
        let path = dir.0.join("latency.svg");
        let input = [
            series("clone", &[3.1, 4.0, 5.2]),
            series("cold boot", &[33000.0, 34100.0]),
        ];
        latency_cdf_svg(&path, "Clone vs cold boot", &input).unwrap();

        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
        assert!(svg.contains("clone"));
        assert!(svg.contains("cold boot"));
        assert!(svg.contains("Clone vs cold boot"));
        assert!(svg.trim_end().ends_with("</svg>"));
        // Only the SVG is left in the directory: the temp file was renamed.
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn single_sample_and_bad_samples() {
        let dir = TempDir::new("single");
        let path = dir.0.join("one.svg");
        let input = [
            series("one", &[5.0, f64::NAN, -1.0, 0.0, f64::INFINITY]),
            series("all-invalid", &[f64::NAN]),
        ];
        latency_cdf_svg(&path, "single", &input).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<circle"));
        assert!(svg.contains("one (n=1)"));
        assert!(!svg.contains("all-invalid"));
    }

    #[test]
    fn empty_input_is_an_error() {
        let dir = TempDir::new("empty");
        let path = dir.0.join("empty.svg");
        assert!(matches!(
            latency_cdf_svg(&path, "t", &[]),
            Err(PlotError::NoSeries)
        ));
        assert!(matches!(
            latency_cdf_svg(
                &path,
                "t",
                &[series("a", &[]), series("b", &[0.0, f64::NAN])]
            ),
            Err(PlotError::NoSamples)
        ));
        assert!(!path.exists());
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let dir = TempDir::new("unwritable");
        let path = dir.0.join("missing-subdir").join("x.svg");
        let err = latency_cdf_svg(&path, "t", &[series("a", &[1.0])]).unwrap_err();
        assert!(matches!(err, PlotError::Write { .. }), "{err}");
    }

    #[test]
    fn bounds_are_whole_decades_with_margin() {
        assert_eq!(decade_range(3.1, 34100.0), (0, 5));
        assert_eq!(decade_range(5.0, 5.0), (0, 1));
        assert_eq!(decade_range(0.35, 0.35), (-1, 0));
        // A sample on a decade gets room on that side.
        assert_eq!(decade_range(10.0, 100.0), (0, 3));
    }

    #[test]
    fn x_ticks_label_decades_or_1_2_5() {
        let (labelled, grid) = x_ticks(0, 5);
        assert_eq!(labelled, [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]);
        assert_eq!(grid.len(), 5 * 8);
        let (labelled, grid) = x_ticks(-1, 0);
        assert_eq!(labelled, [0.1, 0.2, 0.5, 1.0]);
        assert_eq!(grid, [0.3, 0.4, 0.6, 0.7, 0.8, 0.9]);
    }

    #[test]
    fn tick_labels() {
        assert_eq!(format_ms(0.1), "100 µs");
        assert_eq!(format_ms(1.0), "1 ms");
        assert_eq!(format_ms(20.0), "20 ms");
        assert_eq!(format_ms(1000.0), "1 s");
        assert_eq!(format_ms(100000.0), "100 s");
    }
}
