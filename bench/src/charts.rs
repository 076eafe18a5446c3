//! SVG charts of a harness run (plotters): throughput over time per system, and the
//! transaction latency distribution per system.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::harness::Run;

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// Messages per second between samples, smoothed over about half a second.
fn rates(timeline: &[(f64, u64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut i = 0;
    for j in 1..timeline.len() {
        let (t0, n0) = timeline[i];
        let (t1, n1) = timeline[j];
        if t1 - t0 >= 0.5 || j == timeline.len() - 1 {
            out.push((t1, n1.saturating_sub(n0) as f64 / (t1 - t0).max(1e-3)));
            i = j;
        }
    }
    out
}

/// Throughput over time, one line per run (the first repetition of each system).
pub fn throughput(path: &Path, title: &str, runs: &[&Run]) -> Result<()> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = runs
        .iter()
        .filter(|r| !r.timeline.is_empty())
        .map(|r| (r.system.as_str(), rates(&r.timeline)))
        .collect();
    if series.is_empty() {
        return Ok(());
    }
    let x_max = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max * 1.02, 0.0..y_max * 1.1)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("messages/s at the sink")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    lines(&mut chart, &series)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Transaction latency percentiles (p50 … max) per system, log scale.
pub fn latency(path: &Path, title: &str, runs: &[&Run]) -> Result<()> {
    const POINTS: [(&str, &str); 5] = [
        ("p50", "p50"),
        ("p90", "p90"),
        ("p99", "p99"),
        ("p99.9", "p99.9"),
        ("max", "max"),
    ];
    let series: Vec<(&str, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|r| {
            let points = POINTS
                .iter()
                .enumerate()
                .filter_map(|(i, (key, _))| {
                    Some((i as f64, r.blast["latency_ms"][key].as_f64()?.max(0.01)))
                })
                .collect();
            (r.system.as_str(), points)
        })
        .collect();
    let y_max = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.2..4.2, (0.01..y_max * 2.0).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x: &f64| {
            POINTS
                .get(x.round() as usize)
                .map_or(String::new(), |p| p.1.to_string())
        })
        .x_desc("percentile")
        .y_desc("transaction latency, ms (log)")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    lines(&mut chart, &series)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Draws one labelled line per series, and the legend.
fn lines<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// A measure against offered load (messages/s), one line per series, with the
/// planner's predicted knee drawn as a vertical line; `log` for a log-scale y.
pub fn against_offered(
    path: &Path,
    title: &str,
    y_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    knee: f64,
    log: bool,
) -> Result<()> {
    let x_max = (series.iter())
        .flat_map(|(_, s)| s.iter().map(|p| p.0))
        .fold(knee, f64::max)
        * 1.05;
    let y_max = (series.iter())
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let knee_line = |top: f64| {
        LineSeries::new(
            vec![(knee, 0.01), (knee, top)],
            BLACK.mix(0.6).stroke_width(1),
        )
    };
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70);
    if log {
        let mut chart = builder
            .build_cartesian_2d(0.0..x_max, (0.01..y_max * 2.0).log_scale())
            .map_err(|e| anyhow!("{e}"))?;
        mesh(
            chart
                .configure_mesh()
                .x_desc("offered messages/s")
                .y_desc(y_desc)
                .draw(),
        )?;
        offered_lines(&mut chart, series, knee_line(y_max * 2.0))?;
    } else {
        let mut chart = builder
            .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.1)
            .map_err(|e| anyhow!("{e}"))?;
        mesh(
            chart
                .configure_mesh()
                .x_desc("offered messages/s")
                .y_desc(y_desc)
                .draw(),
        )?;
        offered_lines(&mut chart, series, knee_line(y_max * 1.1))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn mesh<E: std::fmt::Display>(drawn: std::result::Result<(), E>) -> Result<()> {
    drawn.map_err(|e| anyhow!("{e}"))
}

/// The knee and the series of [`against_offered`], whatever the y scale.
fn offered_lines<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    series: &[(&str, Vec<(f64, f64)>)],
    knee: LineSeries<SVGBackend<'a>, (f64, f64)>,
) -> Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    (chart.draw_series(knee))
        .map_err(|e| anyhow!("{e}"))?
        .label("predicted knee")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    lines(chart, series)
}
