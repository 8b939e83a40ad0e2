//! The soak's samples as an SVG: one small chart per series over the run (memory, open files,
//! CPU, queues), stacked, each with its axes, labels and the end of the warm-up marked. Drawn
//! with plotters' SVG backend alone (no fonts or bitmaps: the text is SVG text).

use std::path::Path;

use plotters::prelude::*;

use crate::soak::Sample;

/// Width of the picture, and height of one chart.
const WIDTH: u32 = 900;
const CHART_HEIGHT: u32 = 230;

/// One chart: its title, the y axis's label, and its lines.
struct Chart {
    title: &'static str,
    unit: &'static str,
    lines: Vec<Line>,
}

/// A line's name, colour, and value at a sample (None: not sampled).
type Line = (&'static str, RGBColor, fn(&Sample) -> Option<f64>);

/// A green dark enough to read on white.
const GREEN_DARK: RGBColor = RGBColor(0, 140, 0);

fn charts() -> Vec<Chart> {
    vec![
        Chart { title: "Resident memory (VmRSS)", unit: "MiB", lines: vec![("RSS", BLUE, |s| Some(s.rss_bytes as f64 / 1_048_576.0))] },
        Chart { title: "Open files (/proc/PID/fd)", unit: "files", lines: vec![("open files", GREEN_DARK, |s| Some(s.open_files as f64))] },
        Chart { title: "CPU (utime + stime)", unit: "% of a core", lines: vec![("CPU", RED, |s| Some(s.cpu_percent))] },
        Chart {
            title: "Frames queued in the connections' rings (/api/connections)",
            unit: "frames",
            lines: vec![("frames queued", MAGENTA, |s| s.frames_queued.map(|n| n as f64))],
        },
        Chart {
            title: "Connections backpressured (/api/connections)",
            unit: "connections",
            lines: vec![("backpressured", BLACK, |s| s.backpressured.map(|n| n as f64))],
        },
    ]
}

/// Writes `samples` to `path` as an SVG; `warmup` (seconds) is marked; `title` heads it.
pub fn write_svg(path: &Path, title: &str, samples: &[Sample], warmup: f64) -> Result<(), String> {
    let mut svg = String::new();
    draw(&mut svg, title, samples, warmup).map_err(|e| format!("cannot draw the soak chart: {e}"))?;
    std::fs::write(path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn draw(svg: &mut String, title: &str, samples: &[Sample], warmup: f64) -> Result<(), Box<dyn std::error::Error>> {
    let charts = charts();
    let height = 40 + CHART_HEIGHT * charts.len() as u32;
    let root = SVGBackend::with_string(svg, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    // Minutes on the x axis once the run is long enough for seconds to be unreadable.
    let end = samples.last().map_or(1.0, |s| s.t).max(warmup).max(1.0);
    let (scale, x_unit) = if end > 600.0 { (60.0, "minutes since publishing began") } else { (1.0, "seconds since publishing began") };
    for (area, chart) in root.split_evenly((charts.len(), 1)).iter().zip(&charts) {
        let values: Vec<f64> = chart.lines.iter().flat_map(|(_, _, value)| samples.iter().filter_map(value)).collect();
        let top = values.iter().copied().fold(0.0, f64::max);
        // From zero, so a flat line looks flat and a growth looks its size.
        let y_max = if top > 0.0 { top * 1.15 } else { 1.0 };
        let mut plot = ChartBuilder::on(area)
            .caption(chart.title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..end / scale, 0.0..y_max)?;
        plot.configure_mesh().x_desc(x_unit).y_desc(chart.unit).light_line_style(WHITE.mix(0.0)).draw()?;
        let warm = warmup / scale;
        plot.draw_series(LineSeries::new([(warm, 0.0), (warm, y_max)], ShapeStyle::from(&BLACK.mix(0.4)).stroke_width(1)))?
            .label("end of warm-up")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.4)));
        for &(name, color, value) in &chart.lines {
            let points: Vec<(f64, f64)> = samples.iter().filter_map(|s| Some((s.t / scale, value(s)?))).collect();
            plot.draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
            plot.draw_series(points.iter().map(|&p| Circle::new(p, 2, color.filled())))?;
        }
        plot.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_drawn_with_its_labels() {
        let samples: Vec<Sample> = (1..=6)
            .map(|k| Sample {
                t: 10.0 * k as f64,
                rss_bytes: 30 << 20,
                open_files: 250,
                cpu_percent: 12.5,
                frames_queued: Some(1_000 + k),
                backpressured: Some(5),
                connections: Some(240),
            })
            .collect();
        let mut svg = String::new();
        draw(&mut svg, "soak", &samples, 20.0).unwrap();
        assert!(svg.starts_with("<svg"));
        for text in [
            "Resident memory",
            "Open files",
            "CPU",
            "Frames queued",
            "backpressured",
            "MiB",
            "% of a core",
            "seconds since publishing began",
            "end of warm-up",
        ] {
            assert!(svg.contains(text), "no {text:?}");
        }
        // A line per series and one for the end of the warm-up in each chart.
        assert!(svg.matches("<polyline").count() >= 2 * 5);
    }
}
