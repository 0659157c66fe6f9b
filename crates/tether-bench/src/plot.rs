//! Charts of the results, as SVG files next to the JSON, for what a
//! person would rather look at than read: how the orphans' times to
//! re-attach spread (a CDF), and how cost per worker grows with N.
//!
//! A scenario describes its chart as data ([`Chart`]); this module alone
//! knows plotters.

use plotters::prelude::*;
use std::time::Duration;

/// Pixels of one panel.
const PANEL: (u32, u32) = (800, 450);

/// The colours of the series, in order.
const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// What a scenario draws.
#[derive(Debug, Clone)]
pub enum Chart {
    /// The fraction of samples at or below x, with vertical lines at
    /// named values (p50, p99).
    Cdf {
        title: String,
        x_label: String,
        y_label: String,
        samples: Vec<Duration>,
        marks: Vec<(String, Duration)>,
    },
    /// Panels stacked one above the other, each with lines against the
    /// number of workers.
    VersusWorkers { title: String, panels: Vec<Panel> },
}

/// One panel of [`Chart::VersusWorkers`].
#[derive(Debug, Clone)]
pub struct Panel {
    pub y_label: String,
    pub series: Vec<Series>,
}

/// One line: (workers, value) points, in order of workers.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

type Error = String;

fn err(e: impl std::fmt::Display) -> Error {
    format!("cannot draw the chart: {e}")
}

impl Chart {
    /// The chart as an SVG document.
    pub fn svg(&self) -> Result<String, Error> {
        let mut out = String::new();
        match self {
            Chart::Cdf {
                title,
                x_label,
                y_label,
                samples,
                marks,
            } => cdf(&mut out, title, x_label, y_label, samples, marks)?,
            Chart::VersusWorkers { title, panels } => versus(&mut out, title, panels)?,
        }
        Ok(out)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The steps of an empirical CDF: at each sample, the fraction up to it.
pub fn cdf_points(samples: &[Duration]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mut points = Vec::with_capacity(sorted.len() * 2 + 1);
    let mut below = 0.0;
    for (i, x) in sorted.iter().enumerate() {
        points.push((*x, below));
        below = (i + 1) as f64 / n;
        points.push((*x, below));
    }
    points
}

fn cdf(
    out: &mut String,
    title: &str,
    x_label: &str,
    y_label: &str,
    samples: &[Duration],
    marks: &[(String, Duration)],
) -> Result<(), Error> {
    let points = cdf_points(samples);
    let x_max = points.last().map_or(1.0, |p| p.0).max(1.0) * 1.05;
    let root = SVGBackend::with_string(out, PANEL).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..x_max, 0f64..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(points, COLOURS[0].stroke_width(2)))
        .map_err(err)?
        .label(format!("{} samples", samples.len()))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], COLOURS[0].stroke_width(2)));
    for (k, (name, at)) in marks.iter().enumerate() {
        let colour = COLOURS[1 + k % (COLOURS.len() - 1)];
        let x = ms(*at);
        chart
            .draw_series(LineSeries::new(
                [(x, 0.0), (x, 1.0)],
                colour.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("{name} {x:.1} ms"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn versus(out: &mut String, title: &str, panels: &[Panel]) -> Result<(), Error> {
    let rows = panels.len().max(1);
    let size = (PANEL.0, PANEL.1 * rows as u32 + 30);
    let root = SVGBackend::with_string(out, size).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
    for (panel, area) in panels.iter().zip(root.split_evenly((rows, 1))) {
        let all = || panel.series.iter().flat_map(|s| s.points.iter());
        let x_max = all().map(|p| p.0).fold(1.0, f64::max) * 1.05;
        let y_max = all()
            .map(|p| p.1)
            .filter(|y| y.is_finite())
            .fold(0.0, f64::max);
        // Headroom above the lines for the legend.
        let y_max = if y_max > 0.0 { y_max * 1.3 } else { 1.0 };
        let mut chart = ChartBuilder::on(&area)
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("workers")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(panel.y_label.as_str())
            .draw()
            .map_err(err)?;
        for (k, series) in panel.series.iter().enumerate() {
            let colour = COLOURS[k % COLOURS.len()];
            let points: Vec<(f64, f64)> = series
                .points
                .iter()
                .copied()
                .filter(|p| p.1.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                .map_err(err)?
                .label(series.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_steps_up_to_one_at_each_sample() {
        let ms = Duration::from_millis;
        let points = cdf_points(&[ms(30), ms(10), ms(20), ms(20)]);
        assert_eq!(
            points,
            vec![
                (10.0, 0.0),
                (10.0, 0.25),
                (20.0, 0.25),
                (20.0, 0.5),
                (20.0, 0.5),
                (20.0, 0.75),
                (30.0, 0.75),
                (30.0, 1.0),
            ]
        );
    }

    #[test]
    fn charts_are_svg_with_lines() {
        let ms = Duration::from_millis;
        let cdf = Chart::Cdf {
            title: "t".into(),
            x_label: "ms".into(),
            y_label: "fraction".into(),
            samples: vec![ms(5), ms(7), ms(9)],
            marks: vec![("p50".into(), ms(7))],
        }
        .svg()
        .unwrap();
        assert!(cdf.contains("<svg") && cdf.contains("<polyline"), "{cdf}");
        let versus = Chart::VersusWorkers {
            title: "t".into(),
            panels: vec![Panel {
                y_label: "µs".into(),
                series: vec![Series {
                    label: "floor".into(),
                    points: vec![(10.0, 1.0), (20.0, f64::NAN), (30.0, 2.0)],
                }],
            }],
        }
        .svg()
        .unwrap();
        assert!(
            versus.contains("<svg") && versus.contains("<polyline"),
            "{versus}"
        );
    }
}
