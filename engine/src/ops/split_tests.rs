//! Ops over tensors larger than one storage binding (a GPT-2 token embedding, its gradient and AdamW moments on a
//! 128 MiB software GPU): with the binding limit lowered on a device of their own, the split paths give the same
//! results as the whole-tensor paths: bit for bit where each element is computed the same way, and within
//! rounding for reductions, whose tree changes.

use rand::Rng;

use crate::ops::adamw::{adamw_step, AdamW};
use crate::ops::{elementwise, embedding, reduce};
use crate::testing::{random_vec, rng};
use crate::{Gpu, Tensor};

fn device() -> Gpu {
    Gpu::new().unwrap_or_else(|e| panic!("{e}"))
}

/// Run `f` with the real limit, then with `limit`, and return both results.
fn both<T>(gpu: &Gpu, limit: u64, f: impl Fn(&Gpu) -> T) -> (T, T) {
    gpu.set_binding_limit(None);
    let whole = f(gpu);
    gpu.set_binding_limit(Some(limit));
    let parts = f(gpu);
    gpu.set_binding_limit(None);
    (whole, parts)
}

fn read(gpu: &Gpu, t: &Tensor) -> Vec<f32> {
    gpu.read(t).unwrap()
}

#[test]
fn embedding_gather_and_scatter_over_parts_are_bit_identical() {
    let gpu = device();
    let (v, c, b, t, max_t) = (301, 24, 3, 11, 16);
    let mut r = rng(1);
    // Repeated ids, ids at both ends of the table, and ids in every part.
    let mut tokens: Vec<i32> = (0..b * t).map(|_| r.random_range(0..v as i32)).collect();
    tokens[0] = 0;
    tokens[1] = v as i32 - 1;
    tokens[2] = tokens[5];
    let wte_h = random_vec(v * c, 2);
    let wpe_h = random_vec(max_t * c, 3);
    let dout_h = random_vec(b * t * c, 4);
    let limit = 8 << 10;
    let (whole, parts) = both(&gpu, limit, |gpu| {
        let ids = gpu.upload_i32(&tokens, &[b, t]).unwrap();
        let wte = gpu.upload(&wte_h, &[v, c]).unwrap();
        let wpe = gpu.upload(&wpe_h, &[max_t, c]).unwrap();
        let y = embedding::embedding(gpu, &ids, &wte, &wpe).unwrap();
        let y_tok = embedding::token_embedding(gpu, &ids, &wte).unwrap();
        let dout = gpu.upload(&dout_h, &[b, t, c]).unwrap();
        let (dwte, dwpe) = (gpu.upload(&wte_h, &[v, c]).unwrap(), gpu.upload(&wpe_h, &[max_t, c]).unwrap());
        embedding::embedding_backward(gpu, &tokens, &dout, &dwte, &dwpe).unwrap();
        let dwte_tok = gpu.upload(&wte_h, &[v, c]).unwrap();
        embedding::token_embedding_backward(gpu, &tokens, &dout, &dwte_tok).unwrap();
        [read(gpu, &y), read(gpu, &y_tok), read(gpu, &dwte), read(gpu, &dwpe), read(gpu, &dwte_tok)]
    });
    gpu.set_binding_limit(Some(limit));
    assert!(gpu.split_rows("test", v, c).unwrap().len() > 2, "wte should take several parts");
    for (i, what) in ["embedding", "token_embedding", "dwte", "dwpe", "token dwte"].iter().enumerate() {
        assert_eq!(whole[i], parts[i], "{what} differs when the table is split");
    }
}

#[test]
fn elementwise_optimizer_and_norms_over_parts() {
    let gpu = device();
    let n = 5003;
    let (p0, g0) = (random_vec(n, 1), random_vec(n, 2));
    let limit = 4 << 10;
    let cfg = AdamW { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let (whole, parts) = both(&gpu, limit, |gpu| {
        let p = gpu.upload(&p0, &[n]).unwrap();
        let g = gpu.upload(&g0, &[n]).unwrap();
        let (m, v) = (elementwise::zeros(gpu, &[n]).unwrap(), elementwise::zeros(gpu, &[n]).unwrap());
        elementwise::add_inplace(gpu, &g, &p, 0.5).unwrap();
        elementwise::scale_inplace(gpu, &g, 0.75).unwrap();
        for step in 1..=3 {
            adamw_step(gpu, &p, &g, &m, &v, &cfg, step).unwrap();
        }
        let norm = reduce::global_norm(gpu, &[&p, &g]).unwrap();
        let filled = elementwise::zeros(gpu, &[n]).unwrap();
        elementwise::fill(gpu, &filled, 2.5).unwrap();
        [read(gpu, &p), read(gpu, &m), read(gpu, &v), read(gpu, &filled), read(gpu, &norm)]
    });
    for (i, what) in ["param", "m", "v", "fill"].iter().enumerate() {
        assert_eq!(whole[i], parts[i], "{what} differs when split");
    }
    assert!(parts[3].iter().all(|&x| x == 2.5));
    let (a, b) = (whole[4][0], parts[4][0]);
    assert!((a - b).abs() <= 1e-6 * a.abs(), "global norm {a} whole vs {b} in parts");
}

#[test]
fn a_row_wider_than_the_limit_is_a_clear_error() {
    let gpu = device();
    gpu.set_binding_limit(Some(1024));
    let e = gpu.split_rows("embedding", 10, 1000).unwrap_err().to_string();
    assert!(e.contains("max_storage_buffer_binding_size") && e.contains("1024"), "{e}");
}
