#!/usr/bin/env python3
"""Check a checkpoint directory against Hugging Face transformers: it must load strictly (no missing, unexpected
or misshapen tensor) in the class its config.json names, and the mean next-token loss over TEXT must be what
`kiln eval --checkpoint DIR --text TEXT` prints (same windows: consecutive SEQ_LEN-token windows from the start, the
last one shorter, every token after the first predicted once).

    python tools/hf_check.py DIR TEXT [--seq-len T] [--batch B]
    python tools/hf_check.py --random-llama DIR --tokenizer-from KILN_CKPT   # the user's own random LlamaForCausalLM
    python tools/hf_check.py --random-gpt2 DIR --tokenizer-from KILN_CKPT    # GPT2LMHeadModel(GPT2Config()): 124M
    python tools/hf_check.py --grads DIR TOKENS.json INSPECT.safetensors      # `kiln inspect` output vs autograd

Needs torch, transformers and tokenizers (pip install torch transformers tokenizers).
"""
import argparse
import json
import math
import shutil
import sys
from pathlib import Path


def write_random_llama(out: Path, tokenizer_from: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.2,  # far from 0 so that every tensor shows in the loss
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(tokenizer_from / "tokenizer.json", out / "tokenizer.json")
    print(f"wrote a random LlamaForCausalLM ({sum(p.numel() for p in model.parameters())} parameters) to {out}")


def write_random_gpt2(out: Path, tokenizer_from: Path, seed: int) -> None:
    """GPT-2 124M exactly as transformers builds it by default (50257 × 768, 12 layers), random weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config())
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(tokenizer_from / "tokenizer.json", out / "tokenizer.json")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a random GPT2LMHeadModel(GPT2Config()) ({n} parameters) to {out}")


def check(ckpt: Path, text: Path, seq_len: int | None) -> float:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True, dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"{ckpt} does not load strictly in {type(model).__name__}: {problems}")
    model.eval()
    # The text as Kiln reads a corpus file: without a byte-order mark and trailing line breaks.
    body = text.read_text(encoding="utf-8").removeprefix("\ufeff").rstrip("\n\r")
    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(body, add_special_tokens=False).ids
    t = min(seq_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
    if len(ids) < 2:
        sys.exit(f"{text}: {len(ids)} tokens; evaluation needs at least 2")
    # kiln eval's windows: consecutive t-position windows from the start, the last one shorter; every token after
    # the first predicted once. (Batching does not change the sum.)
    total, used, windows = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, t):
            end = min(start + t, len(ids) - 1)
            x = torch.tensor([ids[start:end]])
            y = torch.tensor([ids[start + 1 : end + 1]])
            logits = model(x).logits.double()
            total += torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum").item()
            used += end - start
            windows += 1
    loss = total / used
    print(
        f"{ckpt}: loads strictly in {type(model).__name__}; {used} tokens predicted in {windows} windows of up to {t}, "
        f"loss {loss:.6f} nats/token, perplexity {math.exp(loss):.2f}"
    )
    return loss


def check_grads(ckpt: Path, tokens: Path, inspect: Path) -> float:
    """Logits, loss and every parameter gradient of `kiln inspect --checkpoint DIR --tokens TOKENS.json --out
    INSPECT.safetensors` against transformers' autograd on the same rows; returns the worst relative difference."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    kiln = load_file(str(inspect))
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    rows = torch.tensor(json.loads(tokens.read_text()))
    logits = model(rows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    loss.backward()
    worst = 0.0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        scale = p.grad.abs().max().item() + 1e-12
        worst = max(worst, (kiln[name] - p.grad).abs().max().item() / scale)
    print(
        f"{ckpt}: loss kiln {kiln['loss'].item():.6f} transformers {loss.item():.6f}; "
        f"max |logit diff| {(kiln['logits'] - logits.detach()).abs().max().item():.2e}; "
        f"worst gradient difference {worst:.2e} of the tensor's largest entry"
    )
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path, nargs="?")
    ap.add_argument("text", type=Path, nargs="?")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--batch", type=int, default=8, help="accepted for symmetry with kiln eval; the loss does not depend on it")
    ap.add_argument("--random-llama", type=Path, help="write a random LlamaForCausalLM checkpoint here and stop")
    ap.add_argument("--random-gpt2", type=Path, help="write a random GPT2LMHeadModel(GPT2Config()) here and stop")
    ap.add_argument("--tokenizer-from", type=Path, help="a Kiln checkpoint whose tokenizer and vocab to use")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grads", nargs=3, type=Path, metavar=("DIR", "TOKENS", "INSPECT"))
    a = ap.parse_args()
    if a.grads:
        check_grads(*a.grads)
        return
    if a.random_llama or a.random_gpt2:
        if not a.tokenizer_from:
            ap.error("--random-llama and --random-gpt2 need --tokenizer-from")
        if a.random_llama:
            write_random_llama(a.random_llama, a.tokenizer_from, a.seed)
        else:
            write_random_gpt2(a.random_gpt2, a.tokenizer_from, a.seed)
        return
    if not (a.ckpt and a.text):
        ap.error("give a checkpoint directory and a text file")
    check(a.ckpt, a.text, a.seq_len)


if __name__ == "__main__":
    main()
