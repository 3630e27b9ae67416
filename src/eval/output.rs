//! Where results go: a directory checked for writing before any work starts (an hour-long run
//! must not fail at its end), CSV files and SVG plots written whole or not at all (a temporary
//! file renamed into place), so an interrupted or failed run never leaves a partial CSV.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::EvalError;

/// A results directory that was writable when the run started.
#[derive(Debug, Clone)]
pub struct OutDir {
    dir: PathBuf,
}

impl OutDir {
    /// Creates `dir` if needed and proves it writable with a probe file.
    pub fn prepare(dir: &Path) -> Result<Self, EvalError> {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::Write(dir.to_path_buf(), e))?;
        crate::durable::remove_abandoned(dir);
        let probe = dir.join(format!(".lambdachat-probe-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(|e| EvalError::Write(dir.to_path_buf(), e))?;
        let _ = std::fs::remove_file(&probe);
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Writes `contents` to `file` atomically and durably (see [`crate::durable`]).
    pub fn write(&self, file: &str, contents: &str) -> Result<PathBuf, EvalError> {
        let path = self.path(file);
        crate::durable::write(&path, contents.as_bytes())
            .map_err(|e| EvalError::Write(path.clone(), e))?;
        Ok(path)
    }

    /// Draws `chart` as an SVG into `file` atomically.
    pub fn plot(&self, file: &str, chart: &LineChart) -> Result<PathBuf, EvalError> {
        let path = self.path(file);
        let svg = chart.svg().map_err(|e| EvalError::Plot(path.clone(), e))?;
        self.write(file, &svg)
    }
}

/// A CSV table built in memory (values are numbers and plain names: nothing needs quoting).
pub struct Csv {
    text: String,
    columns: usize,
}

impl Csv {
    pub fn new(header: &[&str]) -> Self {
        Self {
            text: header.join(",") + "\n",
            columns: header.len(),
        }
    }

    pub fn row(&mut self, cells: &[String]) {
        debug_assert_eq!(cells.len(), self.columns);
        let _ = writeln!(self.text, "{}", cells.join(","));
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

/// A text table: a left column of row names, then right-aligned columns, each as wide as its
/// widest cell.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(first: &str, columns: impl IntoIterator<Item = String>) -> Self {
        Self {
            header: std::iter::once(first.to_string()).chain(columns).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines of text.
    pub fn text(&self) -> String {
        let n = self.header.len();
        let width = |i: usize| {
            std::iter::once(&self.header)
                .chain(&self.rows)
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..n).map(width).collect();
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i == 0 {
                    line += &format!("{c:<w$}", w = widths[0]);
                } else {
                    line += &format!("  {c:>w$}", w = widths[i]);
                }
            }
            out += line.trim_end();
            out.push('\n');
        }
        out
    }
}

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart: named series over shared axes, either axis logarithmic.
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(127, 127, 127),
];

impl LineChart {
    /// The chart as SVG text.
    pub fn svg(&self) -> Result<String, String> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (900, 540)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let points = self.series.iter().flat_map(|s| &s.points);
            let finite: Vec<(f64, f64)> = points
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .filter(|(x, y)| (!self.log_x || *x > 0.0) && (!self.log_y || *y > 0.0))
                .copied()
                .collect();
            if finite.is_empty() {
                return Err("no points to draw".into());
            }
            let range = |vals: Vec<f64>, log: bool| {
                let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if log {
                    (lo / 1.2, hi * 1.2)
                } else {
                    let pad = ((hi - lo) * 0.05).max(1e-9);
                    (lo - pad, hi + pad)
                }
            };
            let (x0, x1) = range(finite.iter().map(|p| p.0).collect(), self.log_x);
            let (y0, y1) = range(finite.iter().map(|p| p.1).collect(), self.log_y);
            let mut builder = ChartBuilder::on(&root);
            builder
                .caption(&self.title, ("sans-serif", 22))
                .margin(16)
                .x_label_area_size(44)
                .y_label_area_size(72);
            // plotters types each axis kind differently: four combinations, one body.
            macro_rules! draw {
                ($x:expr, $y:expr) => {{
                    let mut chart = builder
                        .build_cartesian_2d($x, $y)
                        .map_err(|e| e.to_string())?;
                    chart
                        .configure_mesh()
                        .x_desc(&self.x_label)
                        .y_desc(&self.y_label)
                        .draw()
                        .map_err(|e| e.to_string())?;
                    for (i, s) in self.series.iter().enumerate() {
                        let color = COLORS[i % COLORS.len()];
                        let pts: Vec<(f64, f64)> = s
                            .points
                            .iter()
                            .filter(|p| finite.contains(p))
                            .copied()
                            .collect();
                        chart
                            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                            .map_err(|e| e.to_string())?
                            .label(s.name.clone())
                            .legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                            });
                        chart
                            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                            .map_err(|e| e.to_string())?;
                    }
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.85))
                        .border_style(BLACK)
                        .draw()
                        .map_err(|e| e.to_string())?;
                }};
            }
            match (self.log_x, self.log_y) {
                (true, true) => draw!((x0..x1).log_scale(), (y0..y1).log_scale()),
                (true, false) => draw!((x0..x1).log_scale(), y0..y1),
                (false, true) => draw!(x0..x1, (y0..y1).log_scale()),
                (false, false) => draw!(x0..x1, y0..y1),
            }
            root.present().map_err(|e| e.to_string())?;
        }
        Ok(svg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(points: Vec<(f64, f64)>) -> LineChart {
        LineChart {
            title: "ppl".into(),
            x_label: "tokens".into(),
            y_label: "ppl".into(),
            log_x: true,
            log_y: false,
            series: vec![Series {
                name: "lambda".into(),
                points,
            }],
        }
    }

    #[test]
    fn writes_whole_files_and_refuses_unwritable_places() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutDir::prepare(&dir.path().join("a/b")).unwrap();
        let mut csv = Csv::new(&["x", "y"]);
        csv.row(&["1".into(), "2.5".into()]);
        let path = out.write("t.csv", csv.text()).unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "x,y\n1,2.5\n");
        let svg = out
            .plot("t.svg", &chart(vec![(1.0, 2.0), (10.0, 3.0)]))
            .unwrap();
        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("lambda"));
        // Nothing but the two results is left behind (no probe, no temporary file).
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["t.csv", "t.svg"]);
        // A file where the directory should be.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, "x").unwrap();
        assert!(matches!(
            OutDir::prepare(&blocked.join("sub")),
            Err(EvalError::Write(..))
        ));
        assert!(chart(vec![(f64::NAN, 1.0)]).svg().is_err());
    }
}
