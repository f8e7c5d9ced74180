#!/usr/bin/env bash
# One command on a GPU machine: Kiln's matmul (autotuned), causal attention forward+backward and a GPT-2 training
# step, then the same work in PyTorch in the same run, as one markdown table (device, driver, Kiln vs PyTorch,
# ratio) appended to benches/RESULTS.md. It takes prebuilt binaries, so the GPU machine needs no Rust toolchain:
#
#   cargo build --release                      # where Rust is
#   tools/gpu-bench.sh                          # where the GPU is: needs python3 with torch (+ transformers)
#
# With an NVIDIA GPU (nvidia-smi works) it measures the full shapes (matmul 1024³, 4096³ and GPT-2 124M's
# products; attention at T=1024 and 4096; the GPT-2 124M step at B=4, T=1024) in a few minutes. Without one, or
# with --quick, it measures small shapes on whatever adapter wgpu picks (lavapipe here) against PyTorch on the
# CPU, which is how it is tested without a GPU.
#
# Options: --quick, --no-append (print only). Environment: KILN_BIN (default target/release/kiln), PYTHON
# (default python3), KILN_COMMIT (the commit to name when .git is absent), KILN_ADAPTER (which adapter).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=""
append=1
for arg in "$@"; do
  case "$arg" in
    --quick) quick="--quick" ;;
    --no-append) append=0 ;;
    *) echo "gpu-bench: unknown option $arg (known: --quick, --no-append)" >&2; exit 2 ;;
  esac
done
kiln="${KILN_BIN:-target/release/kiln}"
python="${PYTHON:-python3}"
if [[ ! -x "$kiln" ]]; then
  echo "gpu-bench: $kiln not found: build it with 'cargo build --release' (or point KILN_BIN at a kiln binary)" >&2
  exit 1
fi
if ! "$python" -c "import torch" 2>/dev/null; then
  echo "gpu-bench: $python cannot import torch: install PyTorch (and transformers), or set PYTHON" >&2
  exit 1
fi
if [[ -z "$quick" ]] && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-bench: no NVIDIA GPU (nvidia-smi); measuring the --quick shapes against PyTorch on the CPU"
  quick="--quick"
fi
commit="${KILN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

"$kiln" devices
"$kiln" gpu-bench $quick --json "$out/kiln.json"
"$python" benches/torch_bench.py --kiln "$out/kiln.json" --markdown "$out/table.md"
if [[ "$append" == 1 ]]; then
  {
    echo
    echo "### tools/gpu-bench.sh ${quick:+(--quick) }on $(date -u +%F), commit $commit"
    echo
    cat "$out/table.md"
  } >> benches/RESULTS.md
  echo "gpu-bench: appended to benches/RESULTS.md"
fi
