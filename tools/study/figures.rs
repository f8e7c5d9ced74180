//! The study's figures (plotters, PNG): the learning–forgetting frontier against Δ bits/byte and against
//! KL(base ‖ π) with error bars and each method's Pareto front, the forgetting-vs-KL fit, the transfer-matrix heat
//! map, and RL training curves (reward, KL, entropy, equal-reward-group fraction, clip fraction).

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::record::{Method, Study};
use super::report::{front, kl_fits, transfer_matrix, Gain, Summary};

fn colour(m: Method) -> RGBColor {
    match m {
        Method::Sft => RGBColor(31, 119, 180),
        Method::Rl => RGBColor(214, 39, 40),
        Method::BranchSft => RGBColor(23, 190, 207),
        Method::BranchRl => RGBColor(227, 119, 194),
        Method::BranchOnPolicy => RGBColor(44, 160, 44),
        Method::Transfer => RGBColor(80, 80, 80),
    }
}

const METHODS: [Method; 5] = [Method::Sft, Method::Rl, Method::BranchSft, Method::BranchRl, Method::BranchOnPolicy];

fn err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("drawing {}: {e}", path.display())
}

/// (lo, hi) of values with a margin, never empty.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return (-1.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    (lo - pad, hi + pad)
}

/// Costs spanning more than two orders of magnitude are drawn on a log axis (log10 of the cost, zeros at the
/// smallest positive cost ÷ 2).
fn cost_axis(costs: &[f64]) -> Option<f64> {
    let pos: Vec<f64> = costs.iter().copied().filter(|c| *c > 0.0 && c.is_finite()).collect();
    let (lo, hi) = pos.iter().fold((f64::MAX, 0.0f64), |(a, b), &c| (a.min(c), b.max(c)));
    (pos.len() > 1 && hi / lo > 100.0).then_some(lo / 2.0)
}

fn frontier(sums: &[Summary], kl: bool, by: Gain, path: &Path) -> Result<()> {
    let e = err(path);
    let cost = |s: &Summary| if kl { s.kl_base_task } else { s.dbpb };
    let shown: Vec<&Summary> = sums.iter().filter(|s| METHODS.contains(&s.method)).collect();
    let raw: Vec<f64> = shown.iter().map(|s| cost(s).value).collect();
    let floor = if kl { cost_axis(&raw) } else { None };
    let tx = |c: f64| match floor {
        Some(f) => c.max(f).log10(),
        None => c,
    };
    let xs = shown.iter().flat_map(|s| [cost(s).value, cost(s).lo, cost(s).hi]).map(tx);
    let (x0, x1) = span(xs);
    let gain = |s: &Summary| if by == Gain::Accuracy { s.gain } else { s.reward_gain };
    let (y0, y1) = span(shown.iter().flat_map(|s| [gain(s).value, gain(s).lo, gain(s).hi]));
    let root = BitMapBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let what = if kl { "KL(base‖π) nats/token on task inputs" } else { "Δ bits/byte on held-out text" };
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Learning–forgetting frontier: {} vs {what}", by.name()), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|x| e(&x))?;
    let x_label = |v: &f64| if floor.is_some() { format!("{:.0e}", 10f64.powf(*v)) } else { format!("{v:.3}") };
    chart
        .configure_mesh()
        .x_desc(if floor.is_some() { format!("{what} (log scale)") } else { what.to_string() })
        .y_desc(if by == Gain::Accuracy {
            "task gain (chance-corrected accuracy − base)"
        } else {
            "task gain (mean sampled reward − base)"
        })
        .x_label_formatter(&x_label)
        .draw()
        .map_err(|x| e(&x))?;
    for m in METHODS {
        let pts: Vec<&&Summary> = shown.iter().filter(|s| s.method == m).collect();
        if pts.is_empty() {
            continue;
        }
        let c = colour(m);
        for s in &pts {
            let (cx, g) = (tx(cost(s).value), gain(s).value);
            if gain(s).lo.is_finite() && gain(s).hi.is_finite() {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(cx, gain(s).lo), (cx, gain(s).hi)],
                        c.mix(0.5),
                    )))
                    .map_err(|x| e(&x))?;
            }
            let (lo, hi) = (cost(s).lo, cost(s).hi);
            if lo.is_finite() && hi.is_finite() {
                chart
                    .draw_series(std::iter::once(PathElement::new(vec![(tx(lo), g), (tx(hi), g)], c.mix(0.5))))
                    .map_err(|x| e(&x))?;
            }
        }
        chart
            .draw_series(pts.iter().map(|s| Circle::new((tx(cost(s).value), gain(s).value), 4, c.filled())))
            .map_err(|x| e(&x))?;
        let f: Vec<(f64, f64)> = front(sums, m, kl, by, None).iter().map(|p| (tx(p.cost), p.gain)).collect();
        chart
            .draw_series(LineSeries::new(f, c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(m.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

fn kl_fit(sums: &[Summary], path: &Path) -> Result<()> {
    let e = err(path);
    let pts: Vec<(Method, f64, f64)> =
        sums.iter().flat_map(|s| s.per_seed.iter().map(move |p| (s.method, p.2, p.0))).collect();
    let (x0, x1) = span(pts.iter().map(|p| p.1));
    let (y0, y1) = span(pts.iter().map(|p| p.2));
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Forgetting vs KL(base‖π): every checkpoint and seed", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("KL(base‖π) nats/token on task inputs")
        .y_desc("Δ bits/byte on held-out text")
        .draw()
        .map_err(|x| e(&x))?;
    for m in [METHODS.as_slice(), &[Method::Transfer]].concat() {
        let c = colour(m);
        let mine: Vec<(f64, f64)> = pts.iter().filter(|p| p.0 == m).map(|p| (p.1, p.2)).collect();
        if mine.is_empty() {
            continue;
        }
        chart
            .draw_series(mine.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(|x| e(&x))?
            .label(m.name())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
    }
    if let Some((_, Some(lin), _)) = kl_fits(sums).into_iter().find(|f| f.0 == "pooled") {
        let line = [(x0, lin.coef[0] + lin.coef[1] * x0), (x1, lin.coef[0] + lin.coef[1] * x1)];
        chart
            .draw_series(LineSeries::new(line, BLACK.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(format!("pooled linear fit, R² = {:.2}", lin.r2))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

fn transfer(study: &Study, path: &Path) -> Result<bool> {
    let Some((rows, cols, cells)) = transfer_matrix(study) else { return Ok(false) };
    let e = err(path);
    let root =
        BitMapBackend::new(path, (220 + 150 * cols.len() as u32, 120 + 60 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Transfer: chance-corrected gain by training task (rows) and evaluated task (columns)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(180)
        // A segmented 0..n has a segment per value and one past the end: 0..n-1 gives the n cells.
        .build_cartesian_2d(
            (0..cols.len().saturating_sub(1).max(1)).into_segmented(),
            (0..rows.len().saturating_sub(1).max(1)).into_segmented(),
        )
        .map_err(|x| e(&x))?;
    let name = |names: &[String], v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(cols.len())
        .y_labels(rows.len())
        .x_label_formatter(&|v| name(&cols, v))
        .y_label_formatter(&|v| name(&rows, v))
        .draw()
        .map_err(|x| e(&x))?;
    let max = cells.iter().flatten().map(|c| c.value.abs()).filter(|v| v.is_finite()).fold(1e-9, f64::max);
    for (r, row) in cells.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let t = (cell.value / max).clamp(-1.0, 1.0);
            let t = if t.is_finite() { t } else { 0.0 };
            // Blue for gains, red for losses, white for none.
            let shade = |v: f64| (255.0 * (1.0 - v.abs())) as u8;
            let fill = if t >= 0.0 { RGBColor(shade(t), shade(t), 255) } else { RGBColor(255, shade(t), shade(t)) };
            let corner = |c: usize, r: usize| (SegmentValue::Exact(c), SegmentValue::Exact(r));
            chart
                .draw_series(std::iter::once(Rectangle::new([corner(c, r), corner(c + 1, r + 1)], fill.filled())))
                .map_err(|x| e(&x))?;
            let label = format!("{:+.2}", cell.value);
            let style = ("sans-serif", 16).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center));
            let at = (SegmentValue::CenterOf(c), SegmentValue::CenterOf(r));
            chart.draw_series(std::iter::once(Text::new(label, at, style))).map_err(|x| e(&x))?;
        }
    }
    root.present().map_err(|x| e(&x))?;
    Ok(true)
}

fn rl_curves(study: &Study, path: &Path) -> Result<bool> {
    let Some(seed) = study.seeds.first() else { return Ok(false) };
    let runs: Vec<_> = seed.runs.iter().filter(|r| matches!(r.method, Method::Rl | Method::BranchRl)).collect();
    if runs.is_empty() {
        return Ok(false);
    }
    let e = err(path);
    let fields = [
        ("mean_reward", "reward"),
        ("kl", "KL(π‖ref), k3 estimate"),
        ("entropy", "entropy nats/tok"),
        ("equal_reward_groups", "equal-reward groups"),
        ("clip_fraction", "clip fraction"),
    ];
    let root = BitMapBackend::new(path, (1200, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let panels = root.split_evenly((2, 3));
    let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for ((field, title), panel) in fields.iter().zip(panels.iter()) {
        let series: Vec<(String, Vec<(f64, f64)>)> = runs
            .iter()
            .map(|r| {
                let pts =
                    r.curve.iter().filter_map(|m| Some((m.get("step")?.as_f64()?, m.get(*field)?.as_f64()?))).collect();
                (r.name.clone(), pts)
            })
            .collect();
        let (x0, x1) = span(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
        let (y0, y1) = span(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
        let mut chart = ChartBuilder::on(panel)
            .caption(*title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|x| e(&x))?;
        chart.configure_mesh().x_desc("step").draw().map_err(|x| e(&x))?;
        for (i, (name, pts)) in series.into_iter().enumerate() {
            let c = palette[i % palette.len()];
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(true)
}

/// Draw every figure the record supports into `dir`; returns the file names drawn.
pub fn draw_all(study: &Study, sums: &[Summary], dir: &Path) -> Result<Vec<String>> {
    crate::plot::register_font()?;
    let mut out = Vec::new();
    for (kl, by, name) in [
        (false, Gain::Accuracy, "frontier_bpb.png"),
        (true, Gain::Accuracy, "frontier_kl.png"),
        (false, Gain::Reward, "frontier_reward_bpb.png"),
    ] {
        frontier(sums, kl, by, &dir.join(name))?;
        out.push(name.to_string());
    }
    kl_fit(sums, &dir.join("kl_fit.png"))?;
    out.push("kl_fit.png".to_string());
    if transfer(study, &dir.join("transfer.png"))? {
        out.push("transfer.png".to_string());
    }
    if rl_curves(study, &dir.join("rl_curves.png"))? {
        out.push("rl_curves.png".to_string());
    }
    Ok(out)
}
