#!/usr/bin/env python3
"""Peak host memory of one GPT-2 124M training step in PyTorch eager fp32 on the CPU: the baseline `cargo bench
--bench memory` runs as a child process beside Kiln's figures (it is not part of CI).

The step is what Kiln's trainer does: forward, F.cross_entropy on the full [B*T, V] logits, backward, gradient
clipping and AdamW. Prints one JSON line: peak RSS of this process (ru_maxrss), the RSS after importing torch
(the libraries), and the difference, which is what the step itself used.

    python3 benches/torch_step_memory.py --batch 4 --seq-len 1024
"""
import argparse
import json
import resource
import time


def rss_bytes():
    # VmRSS now (ru_maxrss is the peak).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    libs = rss_bytes()
    torch.manual_seed(0)
    # Eager attention (no fused SDPA kernel), fp32: the plain eager baseline.
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    x = torch.randint(0, 50257, (a.batch, a.seq_len + 1))
    start = time.time()
    logits = model(x[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    secs = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "torch": torch.__version__,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "peak_rss_bytes": peak,
        "libraries_rss_bytes": libs,
        "step_bytes": peak - libs,
        "step_seconds": secs,
        "loss": float(loss),
    }))


if __name__ == "__main__":
    main()
