//! `kiln plot`: training curves from a metrics.jsonl (loss and validation loss against step) as a PNG.

use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

/// DejaVu Sans, bundled so charts render the same on machines without system fonts (data/fonts/README.md).
static FONT: &[u8] = include_bytes!("../data/fonts/DejaVuSans.ttf");

/// (step, value) points of one curve.
type Series = Vec<(f64, f64)>;

/// (step, value) series read from JSONL records: training loss, and validation loss where it was measured.
fn read_series(metrics: &Path) -> Result<(Series, Series)> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("reading {}", metrics.display()))?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: line {} is not JSON", metrics.display(), i + 1))?;
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            bail!("{}: line {} has no \"step\"", metrics.display(), i + 1);
        };
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            train.push((step, l));
        }
        if let Some(l) = v.get("val_loss").and_then(|l| l.as_f64()) {
            val.push((step, l));
        }
    }
    if train.is_empty() {
        bail!("{}: no records with a loss to plot", metrics.display());
    }
    Ok((train, val))
}

/// Make the bundled font the charts' "sans-serif".
pub fn register_font() -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the bundled font could not be loaded"))
}

pub fn plot_cmd(metrics: &Path, out: &Path) -> Result<()> {
    let (train, val) = read_series(metrics)?;
    register_font()?;
    let x_max = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let ys = train.iter().chain(&val).map(|p| p.1);
    let (y_min, y_max) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let root = BitMapBackend::new(out, (900, 560)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", out.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Kiln training: {}", metrics.display()), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
        .map_err(|e| draw(&e))?;
    chart.configure_mesh().x_desc("step").y_desc("loss (nats/token)").draw().map_err(|e| draw(&e))?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
        .map_err(|e| draw(&e))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label("validation loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    }
    chart.configure_series_labels().background_style(WHITE).border_style(BLACK).draw().map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    println!("plot: {} training and {} validation points → {}", train.len(), val.len(), out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_metrics_and_names_bad_lines() {
        let dir = std::env::temp_dir().join(format!("kiln-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let metrics = dir.join("metrics.jsonl");
        let lines: Vec<String> = (1..=20)
            .map(|s| {
                let val = if s % 5 == 0 { format!(",\"val_loss\":{}", 5.0 - s as f64 * 0.05) } else { String::new() };
                format!("{{\"step\":{s},\"loss\":{}{val}}}", 6.0 - s as f64 * 0.1)
            })
            .collect();
        std::fs::write(&metrics, lines.join("\n")).unwrap();
        let (train, val) = read_series(&metrics).unwrap();
        assert_eq!((train.len(), val.len()), (20, 4));
        let png = dir.join("loss.png");
        plot_cmd(&metrics, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::write(&metrics, "{\"step\":1,\"loss\":2}\nnot json\n").unwrap();
        let e = read_series(&metrics).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
