//! SVG line charts with `plotters`: one line per server across connection or worker counts.

use std::path::Path;

use plotters::prelude::*;

use crate::matrix::{Cell, Sample, ServerResults};

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// `(x, y)` points, in x order; a point whose `y` is not finite (a failed cell) is a gap,
    /// where the line breaks.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// The runs of finite points between the gaps: the pieces of the line.
    pub fn segments(&self) -> Vec<Vec<(f64, f64)>> {
        self.points
            .split(|p| !p.1.is_finite())
            .filter(|run| !run.is_empty())
            .map(<[(f64, f64)]>::to_vec)
            .collect()
    }
}

/// One line per server: `y(median)` at each cell that `x` maps to a position (cells it maps
/// to `None` are left out); a failed cell is a gap (its `y` is NaN), so the line does not
/// bridge it.
pub fn series_by_cell(
    servers: &[ServerResults],
    x: impl Fn(&Cell) -> Option<f64>,
    y: impl Fn(&Sample) -> f64,
) -> Vec<Series> {
    servers
        .iter()
        .map(|s| {
            let mut points: Vec<(f64, f64)> = s
                .cells
                .iter()
                .filter_map(|c| Some((x(&c.cell)?, c.median().map_or(f64::NAN, |m| y(&m)))))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                label: s.spec.label.clone(),
                points,
            }
        })
        .collect()
}

/// Draws `series` as lines over a logarithmic x axis into an SVG file at `path`.
///
/// Returns `false`, writing nothing, when no series has a point.
///
/// # Errors
///
/// Drawing or writing the file fails.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<bool, String> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if all.is_empty() {
        return Ok(false);
    }
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let xmin = all
        .iter()
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min)
        .max(1e-3);
    let xmax = all.iter().map(|p| p.0).fold(0.0, f64::max);
    let (xmin, xmax) = if xmax > xmin {
        (xmin / 1.3, xmax * 1.3)
    } else {
        (xmin / 2.0, xmax * 2.0)
    };
    let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.12 } else { 1.0 };

    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| crate::report::fmt_count_short(*y))
        .draw()
        .map_err(|e| fail(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        // One line per run of points, so that a failed cell breaks it; the first carries the
        // legend entry.
        for (k, seg) in s.segments().into_iter().enumerate() {
            let drawn = chart
                .draw_series(LineSeries::new(seg.iter().copied(), color.stroke_width(2)))
                .map_err(|e| fail(&e))?;
            if k == 0 {
                drawn.label(s.label.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
            chart
                .draw_series(seg.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| fail(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_cell_breaks_the_line() {
        use crate::matrix::{Outcome, Role};
        let cells = [1, 50, 1000].map(|c| Cell::ping(c, 64, 16));
        let measured = |msgs: f64| {
            let client = crate::proc::parse_client_json(concat!(
                r#"{"backend":"epoll","connections":1,"messages":1,"bytes":64,"elapsed_s":1.0,"#,
                r#""msgs_per_s":1.0,"mb_per_s":1.0,"p50_us":1.0,"p99_us":1.0,"p999_us":1.0,"#,
                r#""max_us":1.0,"errors":{},"error_total":0,"mismatches":0,"ok":true}"#,
            ));
            Outcome::Ok {
                sample: Sample {
                    msgs_per_s: msgs,
                    mb_per_s: 0.0,
                    p50_us: 0.0,
                    p99_us: 0.0,
                    cpu_us_per_msg: 0.0,
                    rss_bytes: 0.0,
                    rss_per_conn: 0.0,
                },
                client: client.unwrap(),
            }
        };
        let rounds = [
            measured(10.0),
            Outcome::Failed {
                why: "refused".to_owned(),
                client: None,
            },
            measured(30.0),
        ];
        let server = crate::report::tests::server(
            "tokio",
            Role::Peer,
            "peer-tokio",
            &cells,
            rounds.into_iter().map(|o| vec![o]).collect(),
        );
        let series = series_by_cell(
            &[server],
            |c| Some(f64::from(c.connections)),
            |s| s.msgs_per_s,
        );
        assert_eq!(series[0].points.len(), 3);
        assert_eq!(
            series[0].segments(),
            [vec![(1.0, 10.0)], vec![(1000.0, 30.0)]]
        );
    }

    #[test]
    fn chart_is_written_as_svg() {
        let dir = std::env::temp_dir().join(format!("ringport-bench-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        let series = vec![
            Series {
                label: "ringport-uring".into(),
                points: vec![(1.0, 10.0), (50.0, 4.0), (1000.0, 2.0)],
            },
            Series {
                label: "tokio".into(),
                points: vec![],
            },
        ];
        assert!(line_chart(&path, "t", "connections", "CPU µs/msg", &series).unwrap());
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("ringport-uring"));
        assert!(!line_chart(&path, "t", "x", "y", &series[1..]).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
