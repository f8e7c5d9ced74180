#!/usr/bin/env bash
# Data-parallel step time on this machine: the same global batch trained by 1 process (grad-accum 2), by 2 MPI
# ranks (grad-accum 1 each) and by 2 ranks with ZeRO-1, split into compute and communication from the metrics
# every data-parallel step writes (bytes all-reduced, time in all-reduce, communication left exposed after the
# backward, overlap). Prints one markdown table (device and commit included) for benches/RESULTS.md.
#
#   benches/mpi_step.sh [--preset tiny] [--steps 12] [--batch 8] [--seq-len 128] [--bucket-mib 4]
#
# Needs Open MPI (tools/setup.sh --mpi) and builds `kiln` with --features mpi. Both ranks share this machine's
# adapter when it has one (lavapipe: they share its CPU cores, so this measures the overheads, not a speed-up).
set -euo pipefail
cd "$(dirname "$0")/.."
preset=tiny steps=12 batch=8 seq=128 bucket=4
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) preset=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --seq-len) seq=$2; shift 2 ;;
    --bucket-mib) bucket=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}" && chmod 700 "$XDG_RUNTIME_DIR"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader \
  OMPI_MCA_btl_vader_single_copy_mechanism=none
cargo build --release --features mpi -q
kiln=target/release/kiln
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$kiln prepare --out "$work/data" --vocab 2048 >/dev/null
common=(pretrain --data "$work/data" --preset "$preset" --steps "$steps" --batch "$batch" --seq-len "$seq"
  --eval-every 100000 --ckpt-every 100000 --bucket-mib "$bucket")
$kiln "${common[@]}" --out "$work/one" --grad-accum 2 >/dev/null 2>&1
mpirun --oversubscribe --bind-to none -np 2 $kiln "${common[@]}" --out "$work/two" --grad-accum 1 >/dev/null 2>&1
mpirun --oversubscribe --bind-to none -np 2 $kiln "${common[@]}" --out "$work/zero" --grad-accum 1 --zero 1 \
  >/dev/null 2>&1
device=$($kiln devices 2>/dev/null | head -1 | sed 's/^\[0\] //')
python3 - "$work" "$device" "$(git rev-parse --short HEAD)" "$preset" "$batch" "$seq" "$bucket" <<'PY'
import json, statistics, sys
work, device, commit, preset, batch, seq, bucket = sys.argv[1:]
def load(name):
    rows = [json.loads(l) for l in open(f"{work}/{name}/metrics.jsonl")]
    return rows[2:]  # the first steps compile shaders
print(f"Data-parallel step, `{preset}` preset, global batch 2×{batch}×{seq} tokens, {bucket} MiB buckets, "
      f"device: {device}, commit {commit} (median over steps 3..):\n")
print("| run | ms/step | tokens/s | comm MiB/step | all-reduce ms | exposed ms | overlap | optimizer MiB/rank | loss at last step |")
print("|---|---|---|---|---|---|---|---|---|")
for name, label in [("one", "1 process, grad-accum 2"), ("two", "2 ranks"), ("zero", "2 ranks, ZeRO-1")]:
    r = load(name)
    med = lambda f: statistics.median(f(x) for x in r)
    comm = [x.get("comm") for x in r]
    have = all(c is not None for c in comm)
    cm = lambda k: f"{statistics.median(c[k] for c in comm):.1f}" if have else "—"
    mib = f"{comm[0]['bytes'] / 2**20:.2f}" if have else "—"
    ov = f"{statistics.median(c['overlap'] for c in comm):.2f}" if have else "—"
    print(f"| {label} | {med(lambda x: x['ms_per_step']):.0f} | {med(lambda x: x['tokens_per_s']):.0f} | {mib} | "
          f"{cm('comm_ms')} | {cm('exposed_ms')} | {ov} | {r[-1]['memory']['optimizer'] / 2**20:.1f} | "
          f"{r[-1]['loss']:.5f} |")
PY
