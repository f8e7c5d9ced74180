//! The statistics a post-training comparison needs, on plain numbers: paired bootstrap intervals over prompts and
//! seeds, chance-corrected accuracy against a majority-answer baseline, Pareto fronts of (cost, gain) points with
//! interpolation at a matched gain, and least-squares fits with their R². `kiln study` builds its report on these.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::eval::evaluate::Estimate;

/// 95% percentile interval of a mean change, from `diffs[seed][stratum][prompt]`: a per-prompt change (a
/// checkpoint's correctness minus the base model's on the same prompt) for each task (stratum) of each seed. The
/// statistic is the mean over seeds of the mean over tasks of the mean over prompts. Every seed is scored on the
/// same prompts (prompt i of a task is the same prompt in every seed), so a resample draws seeds with replacement
/// and one set of prompt indices per task that every drawn seed shares: a prompt's own difficulty is common to all
/// seeds and must not average out across them. Pairing on the prompt removes that difficulty from the change;
/// resampling seeds adds the training run's variance.
pub fn paired_bootstrap(diffs: &[Vec<Vec<f64>>], resamples: usize, seed: u64) -> Estimate {
    let seeds: Vec<&Vec<Vec<f64>>> = diffs.iter().filter(|s| s.iter().any(|d| !d.is_empty())).collect();
    if seeds.is_empty() {
        return Estimate { value: f64::NAN, lo: f64::NAN, hi: f64::NAN };
    }
    // Prompts per task, as every seed has them (the shortest, should one differ).
    let strata = seeds.iter().map(|s| s.len()).min().unwrap_or(0);
    let sizes: Vec<usize> = (0..strata).map(|t| seeds.iter().map(|s| s[t].len()).min().unwrap_or(0)).collect();
    let tasks: Vec<usize> = (0..strata).filter(|&t| sizes[t] > 0).collect();
    let stat = |picks: &[usize], prompts: &[Vec<usize>]| {
        let per_seed = picks.iter().map(|&s| {
            let m = tasks
                .iter()
                .zip(prompts)
                .map(|(&t, idx)| idx.iter().map(|&i| seeds[s][t][i]).sum::<f64>() / idx.len() as f64);
            m.sum::<f64>() / tasks.len() as f64
        });
        per_seed.sum::<f64>() / picks.len() as f64
    };
    let all_seeds: Vec<usize> = (0..seeds.len()).collect();
    let all_prompts: Vec<Vec<usize>> = tasks.iter().map(|&t| (0..sizes[t]).collect()).collect();
    let value = stat(&all_seeds, &all_prompts);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            let picks: Vec<usize> = (0..seeds.len()).map(|_| rng.random_range(0..seeds.len())).collect();
            let prompts: Vec<Vec<usize>> =
                tasks.iter().map(|&t| (0..sizes[t]).map(|_| rng.random_range(0..sizes[t])).collect()).collect();
            stat(&picks, &prompts)
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((means.len() - 1) as f64 * q).round() as usize];
    Estimate { value, lo: at(0.025), hi: at(0.975) }
}

/// 95% Student-t interval of the mean of a few values (e.g. one per seed); NaN bounds with fewer than two.
pub fn t_interval(values: &[f64]) -> Estimate {
    let n = values.len();
    if n == 0 {
        return Estimate { value: f64::NAN, lo: f64::NAN, hi: f64::NAN };
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return Estimate { value: mean, lo: f64::NAN, hi: f64::NAN };
    }
    let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    // Two-sided 97.5% quantiles of Student's t for 1..=30 degrees of freedom, then the normal's.
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    let t = T.get(n - 2).copied().unwrap_or(1.96);
    let half = t * sd / (n as f64).sqrt();
    Estimate { value: mean, lo: mean - half, hi: mean + half }
}

/// The most common answer and the fraction of `answers` it makes up: the accuracy of a model that ignores the
/// question, which chance correction subtracts.
pub fn majority_answer(answers: &[String]) -> (String, f64) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for a in answers {
        *counts.entry(a.as_str()).or_default() += 1;
    }
    // Ties go to the smallest answer, so the baseline does not depend on hash order.
    let best = counts.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)));
    match best {
        Some((a, n)) => (a.to_string(), n as f64 / answers.len() as f64),
        None => (String::new(), 0.0),
    }
}

/// Accuracy rescaled so the majority-answer baseline scores 0 and a perfect model 1 (Cohen's kappa-style);
/// negative below the baseline.
pub fn chance_corrected(accuracy: f64, chance: f64) -> f64 {
    if chance >= 1.0 {
        return 0.0;
    }
    (accuracy - chance) / (1.0 - chance)
}

/// A checkpoint on the learning–forgetting plane: what it cost (e.g. Δ bits/byte or KL from the base) and what it
/// gained (task accuracy over the base).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub cost: f64,
    pub gain: f64,
}

/// The Pareto front of `points` (lower cost and higher gain are better): the points no other point beats on both,
/// by increasing cost (and so increasing gain). Non-finite points are ignored.
pub fn pareto_front(points: &[Point]) -> Vec<Point> {
    let mut pts: Vec<Point> = points.iter().copied().filter(|p| p.cost.is_finite() && p.gain.is_finite()).collect();
    // By cost, and at equal cost the best gain first, so it is the one kept.
    pts.sort_by(|a, b| a.cost.total_cmp(&b.cost).then(b.gain.total_cmp(&a.gain)));
    let mut front: Vec<Point> = Vec::new();
    for p in pts {
        if front.last().is_none_or(|last| p.gain > last.gain) {
            front.push(p);
        }
    }
    front
}

/// The cost at which a front (as [`pareto_front`] returns it) reaches `gain`, interpolating linearly between the
/// two front points around it: the cheapest this method has shown it can buy that gain. `None` outside the gains
/// the front spans, where the method was never seen to reach it (no extrapolation).
pub fn cost_at_gain(front: &[Point], gain: f64) -> Option<f64> {
    let first = front.first()?;
    if gain < first.gain || gain > front.last()?.gain {
        return None;
    }
    if gain == first.gain {
        return Some(first.cost);
    }
    front.windows(2).find(|w| gain <= w[1].gain).map(|w| {
        let t = (gain - w[0].gain) / (w[1].gain - w[0].gain);
        w[0].cost + t * (w[1].cost - w[0].cost)
    })
}

/// A least-squares polynomial fit y ≈ Σ coef[i]·xⁱ and its coefficient of determination.
#[derive(Clone, Debug, PartialEq)]
pub struct Fit {
    pub coef: Vec<f64>,
    pub r2: f64,
    pub n: usize,
}

/// Fit a polynomial of `degree` (1: linear, 2: quadratic) to the points by least squares (normal equations solved
/// by Gaussian elimination with partial pivoting: tiny systems). `None` with fewer than degree + 1 points, when
/// the xs cannot determine the fit (all equal), or when the ys do not vary (R² is undefined).
pub fn poly_fit(xs: &[f64], ys: &[f64], degree: usize) -> Option<Fit> {
    let n = xs.len().min(ys.len());
    let m = degree + 1;
    if n < m {
        return None;
    }
    // Augmented normal equations [XᵀX | Xᵀy].
    let mut a = vec![vec![0.0f64; m + 1]; m];
    for (&x, &y) in xs.iter().zip(ys) {
        let pow: Vec<f64> = (0..m).map(|i| x.powi(i as i32)).collect();
        for i in 0..m {
            for j in 0..m {
                a[i][j] += pow[i] * pow[j];
            }
            a[i][m] += pow[i] * y;
        }
    }
    let scale = a.iter().map(|r| r[..m].iter().fold(0.0f64, |s, v| s.max(v.abs()))).fold(0.0, f64::max);
    for col in 0..m {
        let pivot = (col..m).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() <= 1e-12 * scale.max(1e-300) {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let coef: Vec<f64> = (0..m).map(|i| a[i][m] / a[i][i]).collect();
    let mean = ys[..n].iter().sum::<f64>() / n as f64;
    let predict = |x: f64| coef.iter().enumerate().map(|(i, c)| c * x.powi(i as i32)).sum::<f64>();
    let ss_res: f64 = xs.iter().zip(ys).map(|(&x, &y)| (y - predict(x)).powi(2)).sum();
    let ss_tot: f64 = ys[..n].iter().map(|y| (y - mean).powi(2)).sum();
    if ss_tot <= 0.0 {
        return None;
    }
    Some(Fit { coef, r2: 1.0 - ss_res / ss_tot, n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_interval_is_the_known_standard_error_and_pairs_within_seeds() {
        // A constant change has no spread at all.
        let flat = paired_bootstrap(&[vec![vec![0.25; 40]]], 500, 1);
        assert_eq!((flat.value, flat.lo, flat.hi), (0.25, 0.25, 0.25));
        // 400 draws of ±1 (mean 0.1): the interval is ≈ mean ± 1.96·sd/√n.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let d: Vec<f64> = (0..400).map(|_| if rng.random_bool(0.55) { 1.0 } else { -1.0 }).collect();
        let mean = d.iter().sum::<f64>() / 400.0;
        let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 399.0).sqrt();
        let half = 1.96 * sd / 20.0;
        let e = paired_bootstrap(&[vec![d]], 4000, 7);
        assert!((e.value - mean).abs() < 1e-12);
        assert!(((e.hi - e.lo) / 2.0 - half).abs() < 0.15 * half, "{e:?} vs ±{half}");
        // Two seeds that disagree: resampling seeds widens the interval beyond the prompts' own noise.
        let seeds = vec![vec![vec![0.0; 50]], vec![vec![1.0; 50]]];
        let e = paired_bootstrap(&seeds, 2000, 9);
        assert_eq!(e.value, 0.5);
        assert!(e.lo == 0.0 && e.hi == 1.0, "a quarter of resamples draw seed 0 twice, a quarter seed 1: {e:?}");
        // Seeds scored on the same prompts share each prompt's effect: two identical seeds are no more certain
        // than one (resampling prompts separately per seed would shrink the interval by about √2).
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let d: Vec<f64> = (0..300).map(|_| if rng.random_bool(0.5) { 1.0 } else { 0.0 }).collect();
        let one = paired_bootstrap(&[vec![d.clone()]], 4000, 2);
        let two = paired_bootstrap(&[vec![d.clone()], vec![d]], 4000, 2);
        let (w1, w2) = (one.hi - one.lo, two.hi - two.lo);
        assert!((w2 - w1).abs() < 0.1 * w1, "shared prompts: widths {w1} vs {w2}");
        // Tasks weigh equally however many prompts each has: a 10-prompt task at 1 and a 90-prompt task at 0.
        let e = paired_bootstrap(&[vec![vec![1.0; 10], vec![0.0; 90]]], 200, 1);
        assert_eq!((e.value, e.lo, e.hi), (0.5, 0.5, 0.5));
    }

    #[test]
    fn t_interval_uses_the_t_quantile_of_the_seed_count() {
        // Two values 1 and 3: mean 2, sd √2, half-width 12.706·√2/√2.
        let e = t_interval(&[1.0, 3.0]);
        assert!((e.value - 2.0).abs() < 1e-12 && (e.hi - 2.0 - 12.706).abs() < 1e-9, "{e:?}");
        let one = t_interval(&[5.0]);
        assert!(one.value == 5.0 && one.lo.is_nan(), "one seed has no interval");
        assert!(t_interval(&[]).value.is_nan());
    }

    #[test]
    fn majority_baseline_and_chance_correction() {
        let answers: Vec<String> = ["0", "1", "0", "2", "0", "1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(majority_answer(&answers), ("0".to_string(), 0.5));
        let tie: Vec<String> = ["b", "a"].iter().map(|s| s.to_string()).collect();
        assert_eq!(majority_answer(&tie).0, "a");
        assert_eq!(chance_corrected(0.5, 0.5), 0.0);
        assert_eq!(chance_corrected(1.0, 0.5), 1.0);
        assert_eq!(chance_corrected(0.75, 0.5), 0.5);
        assert!(chance_corrected(0.25, 0.5) < 0.0);
    }

    #[test]
    fn pareto_front_keeps_undominated_points_and_interpolates_cost_at_a_gain() {
        let p = |cost, gain| Point { cost, gain };
        let pts = [p(1.0, 0.5), p(0.0, 0.0), p(2.0, 0.4), p(3.0, 1.0), p(1.0, 0.3), p(f64::NAN, 2.0)];
        let front = pareto_front(&pts);
        assert_eq!(front, vec![p(0.0, 0.0), p(1.0, 0.5), p(3.0, 1.0)]);
        assert_eq!(cost_at_gain(&front, 0.75), Some(2.0));
        assert_eq!(cost_at_gain(&front, 0.25), Some(0.5));
        assert_eq!(cost_at_gain(&front, 0.0), Some(0.0));
        assert_eq!(cost_at_gain(&front, 1.0), Some(3.0));
        assert_eq!(cost_at_gain(&front, 1.1), None, "never extrapolated");
        assert_eq!(cost_at_gain(&[], 0.5), None);
    }

    #[test]
    fn polynomial_fits_recover_exact_coefficients_and_score_noise_lower() {
        let xs = [0.0, 1.0, 2.0, 3.0, 4.0];
        let line: Vec<f64> = xs.iter().map(|x| 1.0 + 2.0 * x).collect();
        let f = poly_fit(&xs, &line, 1).unwrap();
        assert!((f.coef[0] - 1.0).abs() < 1e-9 && (f.coef[1] - 2.0).abs() < 1e-9 && (f.r2 - 1.0).abs() < 1e-12);
        let quad: Vec<f64> = xs.iter().map(|x| 0.5 - x + 0.25 * x * x).collect();
        let f = poly_fit(&xs, &quad, 2).unwrap();
        assert!(f.coef.iter().zip([0.5, -1.0, 0.25]).all(|(a, b)| (a - b).abs() < 1e-9), "{f:?}");
        // A line through a parabola explains part of it, never all.
        let lin = poly_fit(&xs, &quad, 1).unwrap();
        assert!(lin.r2 < 0.99 && lin.r2 >= 0.0, "{lin:?}");
        assert!(poly_fit(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0], 1).is_none(), "equal xs determine no slope");
        assert!(poly_fit(&[1.0], &[1.0], 1).is_none());
        assert!(poly_fit(&xs, &[2.0; 5], 1).is_none(), "constant ys: R² is undefined");
    }
}
