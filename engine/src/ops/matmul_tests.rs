//! Matmul forward and backward against the f64 reference, on every variant this adapter runs.

use super::*;
use crate::testing::{assert_close, gpu, random_vec, to_f64};

/// (m, n, k): 1, odd, primes, exact and off-by-one multiples of the tiles (64×64 tiled; 16×128 register; 32 to
/// 128 blocked), n % 4 == 0 cases that take the register design's vec4 path for B, and all-multiple-of-4 cases
/// (in every transpose) that take the blocked design's vec4 path.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 7, 3),
    (5, 1, 9),
    (17, 33, 65),
    (64, 64, 64),
    (65, 63, 129),
    (5, 12, 7),
    (100, 257, 31),
    (3, 130, 2),
    (33, 260, 17),
    (4, 4, 4),
    (132, 136, 20),
    (128, 128, 128),
    (60, 4, 252),
];

fn check(v: MatmulVariant, batch: usize, (m, n, k): (usize, usize, usize), spec: MatmulSpec, bias: bool, bcast: bool) {
    let gpu = gpu();
    let seed = (m * 1000 + n * 10 + k) as u64;
    let a_shape = if spec.trans_a { [batch, k, m] } else { [batch, m, k] };
    let b_batch = if bcast { 1 } else { batch };
    let b_shape = if spec.trans_b { [b_batch, n, k] } else { [b_batch, k, n] };
    let av = random_vec(batch * m * k, seed);
    let bv = random_vec(b_batch * k * n, seed + 1);
    let biasv = random_vec(n, seed + 2);
    let cv = random_vec(batch * m * n, seed + 3);
    let a = gpu.upload(&av, if batch == 1 { &a_shape[1..] } else { &a_shape }).unwrap();
    let b = gpu.upload(&bv, if batch == 1 || bcast { &b_shape[1..] } else { &b_shape }).unwrap();
    let tb = gpu.upload(&biasv, &[n]).unwrap();
    let c_shape = if batch == 1 { vec![m, n] } else { vec![batch, m, n] };
    let c = gpu.upload(&cv, &c_shape).unwrap();
    matmul_with(gpu, v, &a, &b, bias.then_some(&tb), &c, spec).unwrap();
    let s = matmul_shape(&a, &b, spec).unwrap();
    let want = cpu::matmul(&to_f64(&av), &to_f64(&bv), bias.then(|| to_f64(&biasv)).as_deref(), &to_f64(&cv), &s, spec);
    // Each output sums k products of values in [-1, 1] in f32 (order differs from the reference): the rounding
    // error grows at most like k·2^-24 per unit of magnitude, so 1e-6·k absolute (plus 1e-5 relative) bounds it.
    let what = format!("{v:?} batch {batch} (m,n,k)=({m},{n},{k}) {spec:?} bias {bias} broadcast {bcast}");
    assert_close(&gpu.read(&c).unwrap(), &want, 1e-5, 1e-6 * k as f64 + 1e-6, &what);
}

#[test]
fn every_variant_matches_reference_on_odd_shapes() {
    for v in MatmulVariant::all_available(gpu()) {
        for &shape in SHAPES {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let spec = MatmulSpec { trans_a: ta, trans_b: tb, ..MatmulSpec::default() };
                check(v, 1, shape, spec, false, false);
            }
        }
    }
}

#[test]
fn every_variant_handles_batch_bias_alpha_beta() {
    for v in MatmulVariant::all_available(gpu()) {
        for &shape in &SHAPES[1..6] {
            let spec = MatmulSpec { trans_a: false, trans_b: true, alpha: 0.5, beta: 1.0 };
            check(v, 3, shape, spec, true, false);
            check(v, 2, shape, MatmulSpec { alpha: -2.0, beta: 0.25, ..MatmulSpec::tn() }, false, false);
            check(v, 3, shape, MatmulSpec::nn(), true, true);
        }
    }
}

#[test]
fn software_adapters_run_every_variant_and_default_to_register() {
    let gpu = gpu();
    if gpu.is_software() && gpu.has_subgroups() && gpu.info().subgroup_min_size >= 8 {
        assert_eq!(MatmulVariant::all_available(gpu), MatmulVariant::all());
        assert_eq!(crate::ops::matmul_tune::default_variant(gpu), MatmulVariant::Register);
    }
    assert!(MatmulVariant::Tiled.available(gpu), "the tiled design must run everywhere");
    // lavapipe's limits (1024 invocations, 32 KiB) fit every blocked candidate, so CI tests them all.
    if gpu.is_software() {
        for c in BlockedConfig::CANDIDATES {
            assert!(MatmulVariant::Blocked(c).available(gpu), "{c:?} does not fit {}", gpu.adapter_name());
        }
    }
}

#[test]
fn variant_names_round_trip() {
    for v in MatmulVariant::all() {
        assert_eq!(v.to_string().parse::<MatmulVariant>(), Ok(v));
    }
    assert_eq!("blocked".parse::<MatmulVariant>(), Ok(MatmulVariant::Blocked(BlockedConfig::DEFAULT)));
    // A valid configuration outside the candidate set parses; an invalid one is refused with the forms to use.
    let own = "blocked-32x64x8-4x8".parse::<MatmulVariant>().unwrap();
    assert_eq!(own, MatmulVariant::Blocked(BlockedConfig { bm: 32, bn: 64, bk: 8, tm: 4, tn: 8, shared_a: false }));
    let sg = "blocked-32x64x8-4x8-sg".parse::<MatmulVariant>().unwrap();
    assert_eq!(sg, MatmulVariant::Blocked(BlockedConfig { bm: 32, bn: 64, bk: 8, tm: 4, tn: 8, shared_a: true }));
    assert_eq!(sg.to_string(), "blocked-32x64x8-4x8-sg");
    for bad in
        ["blocked-64x64x6-4x4", "blocked-64x64x16-3x4", "blocked-256x256x16-8x8", "fast", "blocked-1x2", "blocked-sg"]
    {
        let e = bad.parse::<MatmulVariant>().unwrap_err();
        assert!(e.contains("blocked-BMxBNxBK-TMxTN"), "{bad}: {e}");
    }
}

#[test]
fn a_configuration_outside_the_candidates_computes_correctly() {
    let v: MatmulVariant = "blocked-32x64x8-4x8".parse().unwrap();
    for (ta, tb) in [(false, false), (true, true)] {
        check(v, 2, (37, 70, 45), MatmulSpec { trans_a: ta, trans_b: tb, ..MatmulSpec::default() }, true, false);
        check(v, 1, (36, 68, 44), MatmulSpec { trans_a: ta, trans_b: tb, ..MatmulSpec::default() }, false, false);
    }
}

#[test]
fn gpt_sized_product_matches_reference() {
    // One larger case per variant: a [129, 768] activation times a [768, 301] weight.
    for v in MatmulVariant::all_available(gpu()) {
        check(v, 1, (129, 301, 768), MatmulSpec::nn(), true, false);
    }
}

#[test]
fn bad_shapes_are_typed_errors() {
    let gpu = gpu();
    let a = gpu.upload(&random_vec(6, 1), &[2, 3]).unwrap();
    let b = gpu.upload(&random_vec(8, 2), &[4, 2]).unwrap();
    let r = matmul(gpu, &a, &b, None, MatmulSpec::nn());
    assert!(matches!(r, Err(Error::Shape { what: "inner dimension", .. })), "{r:?}");
    assert!(matches!(matmul(gpu, &a, &b, None, MatmulSpec::nt()), Err(Error::Shape { .. })));
    let c = gpu.alloc(&[2, 5], DType::F32).unwrap();
    let b2 = gpu.upload(&random_vec(12, 3), &[3, 4]).unwrap();
    assert!(matches!(
        matmul_with(gpu, MatmulVariant::Tiled, &a, &b2, None, &c, MatmulSpec::nn()),
        Err(Error::Shape { what: "output", .. })
    ));
    let bias = gpu.upload(&[1.0, 2.0], &[2]).unwrap();
    assert!(matches!(matmul(gpu, &a, &b2, Some(&bias), MatmulSpec::nn()), Err(Error::Shape { what: "bias", .. })));
    let v1 = gpu.upload(&[1.0, 2.0, 3.0], &[3]).unwrap();
    assert!(matches!(matmul(gpu, &v1, &b2, None, MatmulSpec::nn()), Err(Error::Shape { what: "operand ranks", .. })));
    let ids = gpu.upload_i32(&[1, 2, 3, 4, 5, 6], &[2, 3]).unwrap();
    assert!(matches!(matmul(gpu, &ids, &b2, None, MatmulSpec::nn()), Err(Error::DType { .. })));
}

#[test]
fn operand_larger_than_a_binding_is_a_limit_error() {
    let gpu = gpu();
    let limit = gpu.limits().max_storage_buffer_binding_size;
    let rows = (limit / 4 / 64 + 1) as usize; // one row past what one binding can hold
    if (rows * 64 * 4) as u64 > gpu.limits().max_buffer_size {
        // Such an adapter cannot even allocate it: that must be the typed error instead.
        assert!(matches!(gpu.alloc(&[rows, 64], DType::F32), Err(Error::Limit { .. })));
        return;
    }
    let a = gpu.alloc(&[rows, 64], DType::F32).unwrap();
    let b = gpu.alloc(&[64, 1], DType::F32).unwrap();
    match matmul(gpu, &a, &b, None, MatmulSpec::nn()) {
        Err(Error::Limit { limit_name, adapter, .. }) => {
            assert_eq!(limit_name, "max_storage_buffer_binding_size");
            assert_eq!(adapter, gpu.adapter_name());
        }
        other => panic!("expected a limit error, got {other:?}"),
    }
}

/// Σ W ⊙ C for a fixed W: a scalar whose gradient w.r.t. C is W, so dC = W in the backward checks.
fn weighted_output(a: &[f64], b: &[f64], bias: &[f64], w: &[f64], s: &MatmulShape, spec: MatmulSpec) -> f64 {
    let c = cpu::matmul(a, b, Some(bias), &vec![0.0; w.len()], s, spec);
    c.iter().zip(w).map(|(c, w)| c * w).sum()
}

#[test]
fn cpu_backward_matches_finite_differences() {
    use crate::testing::{assert_close_f64, numeric_gradient};
    let gpu = gpu();
    for (batch, bcast) in [(1, false), (2, false), (3, true)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            if bcast && ta {
                continue; // unsupported combination (a typed error, tested below)
            }
            let spec = MatmulSpec { trans_a: ta, trans_b: tb, ..MatmulSpec::default() };
            let (m, n, k) = (3, 5, 4);
            let a_shape = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
            let bb = if bcast { 1 } else { batch };
            let b_shape = if tb { vec![bb, n, k] } else { vec![bb, k, n] };
            let a = gpu.alloc(&a_shape, DType::F32).unwrap();
            let b = gpu.alloc(if bcast { &b_shape[1..] } else { &b_shape }, DType::F32).unwrap();
            let s = matmul_shape(&a, &b, spec).unwrap();
            let (av, bv) = (to_f64(&random_vec(a.numel(), 1)), to_f64(&random_vec(b.numel(), 2)));
            let (biasv, w) = (to_f64(&random_vec(n, 3)), to_f64(&random_vec(batch * m * n, 4)));
            let (da, db, dbias) = cpu::matmul_backward(&av, &bv, &w, &s, spec);
            let h = 1e-6;
            // Central differences of a bilinear function are exact up to f64 rounding (~1e-10 here).
            let what = format!("batch {batch} bcast {bcast} {spec:?}");
            let num_a = numeric_gradient(|x| weighted_output(x, &bv, &biasv, &w, &s, spec), &av, h);
            assert_close_f64(&da, &num_a, 1e-7, 1e-8, &format!("dA {what}"));
            let num_b = numeric_gradient(|x| weighted_output(&av, x, &biasv, &w, &s, spec), &bv, h);
            assert_close_f64(&db, &num_b, 1e-7, 1e-8, &format!("dB {what}"));
            let num_bias = numeric_gradient(|x| weighted_output(&av, &bv, x, &w, &s, spec), &biasv, h);
            assert_close_f64(&dbias, &num_bias, 1e-7, 1e-8, &format!("dbias {what}"));
        }
    }
}

#[test]
fn gpu_backward_matches_reference() {
    let gpu = gpu();
    for &(m, n, k) in &[(1, 1, 1), (7, 13, 5), (33, 64, 17), (65, 130, 31)] {
        for (batch, bcast) in [(1, false), (3, false), (2, true)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                if bcast && ta {
                    continue;
                }
                let spec = MatmulSpec { trans_a: ta, trans_b: tb, ..MatmulSpec::default() };
                let a_shape = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
                let bb = if bcast { 1 } else { batch };
                let b_shape = if tb { vec![bb, n, k] } else { vec![bb, k, n] };
                let a_shape = if batch == 1 { a_shape[1..].to_vec() } else { a_shape };
                let b_shape = if batch == 1 || bcast { b_shape[1..].to_vec() } else { b_shape };
                let seed = (m * 100 + n + k) as u64;
                let av = random_vec(a_shape.iter().product(), seed);
                let bv = random_vec(b_shape.iter().product(), seed + 1);
                let (a, b) = (gpu.upload(&av, &a_shape).unwrap(), gpu.upload(&bv, &b_shape).unwrap());
                let s = matmul_shape(&a, &b, spec).unwrap();
                let dcv = random_vec(batch * m * n, seed + 2);
                let dc = gpu.upload(&dcv, &s.out_shape(a_shape.len())).unwrap();
                let (da, db, dbias) = matmul_backward(gpu, &a, &b, &dc, spec, [true, true, true]).unwrap();
                let (wa, wb, wbias) = cpu::matmul_backward(&to_f64(&av), &to_f64(&bv), &to_f64(&dcv), &s, spec);
                let what = format!("({m},{n},{k}) batch {batch} bcast {bcast} {spec:?}");
                // Sums of up to batch·max(m, n, k) products of values in [-1, 1], in f32.
                let atol = 1e-6 * (batch * m.max(n).max(k)) as f64 + 1e-6;
                let (da, db) = (da.unwrap(), db.unwrap());
                assert_eq!(da.shape(), a.shape());
                assert_eq!(db.shape(), b.shape());
                assert_close(&gpu.read(&da).unwrap(), &wa, 1e-5, atol, &format!("dA {what}"));
                assert_close(&gpu.read(&db).unwrap(), &wb, 1e-5, atol, &format!("dB {what}"));
                assert_close(&gpu.read(&dbias.unwrap()).unwrap(), &wbias, 1e-5, atol, &format!("dbias {what}"));
            }
        }
    }
}

#[test]
fn backward_rejects_bad_gradient_shapes() {
    let gpu = gpu();
    let a = gpu.upload(&random_vec(6, 1), &[2, 3]).unwrap();
    let b = gpu.upload(&random_vec(12, 2), &[3, 4]).unwrap();
    let dc = gpu.upload(&random_vec(6, 3), &[2, 3]).unwrap();
    let r = matmul_backward(gpu, &a, &b, &dc, MatmulSpec::nn(), [true; 3]);
    assert!(matches!(r, Err(Error::Shape { what: "dC", .. })), "{r:?}");
    let a3 = gpu.upload(&random_vec(24, 4), &[2, 3, 4]).unwrap();
    let dc3 = gpu.upload(&random_vec(24, 5), &[2, 4, 3]).unwrap();
    // A [2,3,4] read transposed is [2,4,3]; a broadcast B [3,3]: unsupported for dB, a typed error.
    let b2t = gpu.upload(&random_vec(9, 7), &[3, 3]).unwrap();
    let r = matmul_backward(gpu, &a3, &b2t, &dc3, MatmulSpec::tn(), [false, true, false]);
    assert!(matches!(r, Err(Error::Invalid { .. })), "{r:?}");
}
