// Optimizer kernels: AdamW with decoupled weight decay (as torch.optim.AdamW), one fused elementwise pass that
// updates parameter, first and second moments in place. Launch grid: 1-D over n, folded into x/y.

struct Params {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    // 1 - beta^t, computed on the host in f64: beta^t in f32 loses digits after a few thousand steps.
    bias_correction1: f32,
    bias_correction2: f32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read_write> param: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> m: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn adamw(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wg.y * nwg.x + wg.x) * WG + lid;
    if (i >= p.n) {
        return;
    }
    let g = grad[i];
    let m1 = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    let v1 = p.beta2 * v[i] + (1.0 - p.beta2) * (g * g);
    m[i] = m1;
    v[i] = v1;
    let m_hat = m1 / p.bias_correction1;
    let v_hat = v1 / p.bias_correction2;
    let w = param[i];
    // Decay uses the weight before this step, as PyTorch's p.mul_(1 - lr * wd) ahead of the Adam update.
    param[i] = w - p.lr * (m_hat / (sqrt(v_hat) + p.eps) + p.weight_decay * w);
}
