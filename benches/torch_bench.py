#!/usr/bin/env python3
"""PyTorch's half of tools/gpu-bench.sh: reads the JSON `kiln gpu-bench` wrote, runs exactly the same work in
PyTorch on the same machine (CUDA when present, else the CPU), and prints one markdown table of Kiln vs PyTorch
with the ratio. Not part of CI.

    python3 benches/torch_bench.py --kiln gpu-bench.json [--markdown table.md]

Baselines: torch.matmul in fp32 with TF32 off (the like-for-like figure; on CUDA also TF32 and bf16 as the
"fast" reference), F.scaled_dot_product_attention (causal) forward + backward, and the same GPT-2 training step
in eager fp32 with TF32 off (forward, cross-entropy over the full logits, backward, clipping, AdamW).
"""
import argparse
import json
import math
import platform
import time


def timed(fn, sync, min_s, min_reps):
    """Seconds per call, measured as Kiln's side is: a warm-up call, one timed alone as an estimate, then enough
    back-to-back calls for about min_s (at least min_reps) and one sync."""
    fn()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    estimate = time.perf_counter() - t
    reps = min(10_000, max(min_reps, math.ceil(min_s / estimate)))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", required=True, help="the JSON kiln gpu-bench wrote")
    ap.add_argument("--markdown", help="also write the table here")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F

    k = json.load(open(a.kiln))
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    min_s = 0.3 if k["quick"] else 1.0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = []  # (work, kiln figure, torch figure, unit, ratio kiln/torch where higher is better)

    for m in k["matmul"]:
        x = torch.randn(m["m"], m["k"], device=dev)
        y = torch.randn(m["k"], m["n"], device=dev)
        flops = 2 * m["m"] * m["n"] * m["k"]
        secs = timed(lambda: torch.matmul(x, y), sync, min_s, 3)
        fp32 = flops / secs / 1e9
        fast = []
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            fast.append(("TF32", flops / timed(lambda: torch.matmul(x, y), sync, min_s, 3) / 1e9))
            torch.backends.cuda.matmul.allow_tf32 = False
            xb, yb = x.bfloat16(), y.bfloat16()
            fast.append(("bf16", flops / timed(lambda: torch.matmul(xb, yb), sync, min_s, 3) / 1e9))
        note = "; ".join(f"{n} {g:.0f}" for n, g in fast)
        rows.append((f"matmul {m['name']} ({m['m']}×{m['n']}×{m['k']}, Kiln {m['variant']})", m["gflops"], fp32,
                     "GFLOP/s", m["gflops"] / fp32, note))

    for at in k["attention"]:
        b, t, c, nh = at["b"], at["t"], at["c"], at["nh"]
        hs = c // nh
        q, kk, v = (torch.randn(b, nh, t, hs, device=dev, requires_grad=True) for _ in range(3))
        dy = torch.randn(b, nh, t, hs, device=dev)

        def fwd_bwd():
            out = F.scaled_dot_product_attention(q, kk, v, is_causal=True)
            out.backward(dy)

        secs = timed(fwd_bwd, sync, min_s, 2)
        flops = 7 * b * nh * t * (t + 1) * hs  # the count Kiln uses (forward 2 products, backward 5)
        rows.append((f"attention fwd+bwd B{b} T{t} C{c} NH{nh} (SDPA)", at["gflops"], flops / secs / 1e9, "GFLOP/s",
                     at["gflops"] / (flops / secs / 1e9), ""))

    for st in k["step"]:
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=st["vocab"], n_positions=st["n_ctx"], n_embd=st["n_embd"], n_layer=st["n_layer"],
                         n_head=st["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        model = GPT2LMHeadModel(cfg).to(dev)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
        x = torch.randint(0, st["vocab"], (st["batch"], st["seq_len"] + 1), device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            logits = model(x[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.item()  # Kiln's step reads its loss back too

        secs = timed(step, sync, min_s * 3, 3)
        tps = st["batch"] * st["seq_len"] / secs
        rows.append((f"train step {st['preset']} ({st['params']/1e6:.1f}M params) B{st['batch']} T{st['seq_len']}, "
                     "eager fp32", st["tokens_per_s"], tps, "tokens/s", st["tokens_per_s"] / tps, ""))

    kiln_dev = f"{k['adapter']} ({k['driver'].strip()})"
    lines = [
        f"Kiln on {kiln_dev}; PyTorch {torch.__version__} on {device_name}"
        + ("" if cuda else " (no CUDA: the CPU is the baseline)") + f"; {'--quick shapes' if k['quick'] else 'full shapes'}.",
        "",
        "| work | Kiln | PyTorch | unit | Kiln / PyTorch | PyTorch fast paths |",
        "|---|---:|---:|---|---:|---|",
    ]
    for work, kv, tv, unit, ratio, note in rows:
        lines.append(f"| {work} | {kv:.1f} | {tv:.1f} | {unit} | {ratio:.3f} | {note} |")
    table = "\n".join(lines)
    print(table)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
