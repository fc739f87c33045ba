//! What a benchmark run leaves behind: its figures as JSON and as PNG plots,
//! in `benches/results/` (or `$VEIL_BENCH_OUT`), one file pair per bench.
//!
//! The plots are horizontal bars, labelled in the plot itself, so that a
//! reader sees each figure next to its baseline without a legend to decode:
//! [`bars`] for one value per row, [`stacked`] for rows split into phases,
//! [`distribution`] for the sorted samples of several series.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{anyhow, Context, Result};
use plotters::{
    coord::{types::RangedCoordf64, Shift},
    prelude::*,
    style::{register_font, FontStyle},
};

/// Where the DejaVu Sans of Debian's `fonts-dejavu-core` lives.
const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One colour per series or phase, in order.
const PALETTE: [RGBColor; 16] = [
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
    RGBColor(174, 199, 232),
    RGBColor(255, 187, 120),
    RGBColor(152, 223, 138),
    RGBColor(255, 152, 150),
    RGBColor(197, 176, 213),
    RGBColor(196, 156, 148),
];

/// A chart of horizontal rows over an `f64` value axis.
type Chart<'a> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

const ROW_PX: u32 = 46;
const LEGEND_PX: u32 = 22;
const LEGEND_COLUMNS: usize = 3;
const WIDTH: u32 = 1100;

/// The results directory: `$VEIL_BENCH_OUT` or `benches/results`.
pub fn out_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("VEIL_BENCH_OUT") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("results"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes `value` as `<out_dir>/<name>.json` and returns the path.
pub fn write_json(name: &str, value: &serde_json::Value) -> Result<PathBuf> {
    let path = out_dir()?.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Registers the plots' font once (`$VEIL_BENCH_FONT` or DejaVu Sans).
fn font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = std::env::var("VEIL_BENCH_FONT").unwrap_or_else(|_| DEFAULT_FONT.into());
        let bytes = std::fs::read(&path).map_err(|e| {
            format!("plot font {path}: {e} (install fonts-dejavu-core or set VEIL_BENCH_FONT)")
        })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("plot font {path} is not a TrueType font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn png_path(name: &str) -> Result<PathBuf> {
    Ok(out_dir()?.join(format!("{name}.png")))
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

/// A value with its unit, as printed next to a bar.
fn figure(v: f64, unit: &str) -> String {
    if v >= 100.0 {
        format!("{v:.0} {unit}")
    } else if v >= 10.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.2} {unit}")
    }
}

/// Draws a chart of `rows` horizontal rows over `0..max` on a fresh PNG and
/// hands the chart to `draw`.
fn horizontal<F>(
    name: &str,
    title: &str,
    unit: &str,
    rows: usize,
    max: f64,
    legend: &[(&str, RGBColor)],
    draw: F,
) -> Result<PathBuf>
where
    F: for<'a> FnOnce(&mut Chart<'a>) -> Result<()>,
{
    font()?;
    let path = png_path(name)?;
    let chart_px = 120 + ROW_PX * rows.max(1) as u32;
    let key_rows = legend.len().div_ceil(LEGEND_COLUMNS) as u32;
    let key_px = if legend.is_empty() {
        0
    } else {
        16 + LEGEND_PX * key_rows
    };
    let height = chart_px + key_px;
    {
        let root = BitMapBackend::new(&path, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (plot_area, key_area) = if legend.is_empty() {
            (root.clone(), None)
        } else {
            let (top, bottom) = root.split_vertically(chart_px);
            (top, Some(bottom))
        };
        if let Some(key) = key_area {
            let column_px = (WIDTH - 40) / LEGEND_COLUMNS as u32;
            for (k, (label, colour)) in legend.iter().enumerate() {
                let x = 20 + (column_px * (k % LEGEND_COLUMNS) as u32) as i32;
                let y = 8 + (LEGEND_PX * (k / LEGEND_COLUMNS) as u32) as i32;
                key.draw(&Rectangle::new([(x, y), (x + 16, y + 14)], colour.filled()))
                    .map_err(plot_err)?;
                key.draw(&Text::new(
                    label.to_string(),
                    (x + 22, y),
                    ("sans-serif", 14),
                ))
                .map_err(plot_err)?;
            }
        }
        let mut chart = chart_on(&plot_area, title, rows, max)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc(unit)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        draw(&mut chart)?;
        root.present().map_err(plot_err)?;
    }
    Ok(path)
}

fn chart_on<'a>(
    root: &DrawingArea<BitMapBackend<'a>, Shift>,
    title: &str,
    rows: usize,
    max: f64,
) -> Result<Chart<'a>> {
    // Room to the right of the longest bar for its label.
    let x_max = if max > 0.0 { max * 1.6 } else { 1.0 };
    ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .build_cartesian_2d(0.0..x_max, 0.0..rows.max(1) as f64)
        .map_err(plot_err)
}

/// The vertical extent of row `i` of `rows` (first row on top).
fn row_span(i: usize, rows: usize) -> (f64, f64) {
    let top = (rows - i) as f64;
    (top - 0.8, top - 0.2)
}

/// One bar per `(label, value)`, labelled with the label and the value.
pub fn bars(name: &str, title: &str, unit: &str, rows: &[(String, f64)]) -> Result<PathBuf> {
    let max = rows.iter().map(|r| r.1).fold(0.0, f64::max);
    let n = rows.len();
    horizontal(name, title, unit, n, max, &[], |chart| {
        for (i, (label, v)) in rows.iter().enumerate() {
            let (lo, hi) = row_span(i, n);
            let colour = PALETTE[i % PALETTE.len()];
            chart
                .draw_series([Rectangle::new([(0.0, lo), (*v, hi)], colour.filled())])
                .map_err(plot_err)?;
            chart
                .draw_series([Text::new(
                    format!("{label}: {}", figure(*v, unit)),
                    (*v + max * 0.01, (lo + hi) / 2.0 + 0.12),
                    ("sans-serif", 15),
                )])
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

/// One bar per row, split into its `(phase, value)` segments end to end;
/// phases of the same name share a colour and one legend entry.
pub fn stacked(
    name: &str,
    title: &str,
    unit: &str,
    rows: &[(String, Vec<(String, f64)>)],
) -> Result<PathBuf> {
    let total = |r: &[(String, f64)]| r.iter().map(|p| p.1).sum::<f64>();
    let max = rows.iter().map(|r| total(&r.1)).fold(0.0, f64::max);
    let n = rows.len();
    let mut phases: Vec<&str> = Vec::new();
    for (_, segs) in rows {
        for (p, _) in segs {
            if !phases.contains(&p.as_str()) {
                phases.push(p);
            }
        }
    }
    let legend: Vec<(&str, RGBColor)> = phases
        .iter()
        .enumerate()
        .map(|(k, p)| (*p, PALETTE[k % PALETTE.len()]))
        .collect();
    horizontal(name, title, unit, n, max, &legend, |chart| {
        for (k, phase) in phases.iter().enumerate() {
            let colour = PALETTE[k % PALETTE.len()];
            let mut rects = Vec::new();
            for (i, (_, segs)) in rows.iter().enumerate() {
                let (lo, hi) = row_span(i, n);
                let mut x = 0.0;
                for (p, v) in segs {
                    if p == phase {
                        rects.push(Rectangle::new([(x, lo), (x + v, hi)], colour.filled()));
                    }
                    x += v;
                }
            }
            chart.draw_series(rects).map_err(plot_err)?;
        }
        for (i, (label, segs)) in rows.iter().enumerate() {
            let (lo, hi) = row_span(i, n);
            let t = total(segs);
            chart
                .draw_series([Text::new(
                    format!("{label}: {}", figure(t, unit)),
                    (t + max * 0.01, (lo + hi) / 2.0 + 0.12),
                    ("sans-serif", 15),
                )])
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

/// Each series' samples, sorted, as points along its own row: the spread
/// and the median (a black tick) at a glance.
pub fn distribution(
    name: &str,
    title: &str,
    unit: &str,
    series: &[(String, Vec<f64>)],
) -> Result<PathBuf> {
    let max = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(0.0, f64::max);
    let n = series.len();
    horizontal(name, title, unit, n, max, &[], |chart| {
        for (i, (label, samples)) in series.iter().enumerate() {
            let (lo, hi) = row_span(i, n);
            let mid = (lo + hi) / 2.0;
            let colour = PALETTE[i % PALETTE.len()];
            let mut sorted = samples.clone();
            sorted.sort_by(f64::total_cmp);
            chart
                .draw_series(
                    sorted
                        .iter()
                        .map(|v| Circle::new((*v, mid), 4, colour.filled())),
                )
                .map_err(plot_err)?;
            if let Some(m) = median(&sorted) {
                chart
                    .draw_series([PathElement::new([(m, lo), (m, hi)], BLACK.stroke_width(2))])
                    .map_err(plot_err)?;
                let end = sorted.last().copied().unwrap_or(m);
                chart
                    .draw_series([Text::new(
                        format!("{label}: median {} (n={})", figure(m, unit), sorted.len()),
                        (end + max * 0.01, mid + 0.12),
                        ("sans-serif", 15),
                    )])
                    .map_err(plot_err)?;
            }
        }
        Ok(())
    })
}

/// The median of `v` in any order (NaN when empty).
pub fn median_of(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    median(&s).unwrap_or(f64::NAN)
}

/// The median of sorted `v`, if any.
pub fn median(v: &[f64]) -> Option<f64> {
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_written_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let keep = std::env::var_os("VEIL_PLOT_KEEP");
        std::env::set_var(
            "VEIL_BENCH_OUT",
            keep.map(std::path::PathBuf::from)
                .unwrap_or_else(|| dir.path().into()),
        );
        let b = bars(
            "t-bars",
            "bars",
            "ms",
            &[("a".into(), 3.0), ("b".into(), 120.0)],
        )
        .unwrap();
        let s = stacked(
            "t-stacked",
            "stacked",
            "ms",
            &[
                (
                    "veil".into(),
                    vec![("boot".into(), 10.0), ("start".into(), 5.0)],
                ),
                ("floor".into(), vec![("boot".into(), 9.0)]),
            ],
        )
        .unwrap();
        let d = distribution("t-dist", "dist", "ms", &[("x".into(), vec![1.0, 3.0, 2.0])]).unwrap();
        for p in [b, s, d] {
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", p.display());
        }
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), Some(2.5));
    }
}
