#!/usr/bin/env bash
# The CUDA backend on a machine with an NVIDIA GPU: builds `--features cuda` (release), times
# `fedhcc bench train --model preop` on cuda beside the CPU backend (flex), and checks that a few
# training steps on the two backends agree.
#
#   scripts/gpu-check.sh            # exit 0: agree; 1: disagree or a run failed; 2: no usable GPU
#
# Agreement: the same synthetic site (64 patients, batch 8: 8 AdamW steps), initial weights and seed
# on both backends; the epoch's mean batch objective (`train_loss`) must agree to LOSS_RTOL and the
# norm of the weight update (`update_norm`) to UPDATE_RTOL, relative. The backends sum in different
# orders, so bit equality is not expected; a wrong kernel gives differences far above these.
# The timing runs use the default site of 290 patients. Environment: CARGO_TARGET_DIR (as cargo),
# LOSS_RTOL (default 1e-3), UPDATE_RTOL (default 1e-2), CHECK_PATIENTS (default 64).
# Status: written on a machine without a GPU; only the no-GPU exit (2) has been exercised so far, so
# the tolerances above are estimates, not yet measured on cuda.
set -euo pipefail
cd "$(dirname "$0")/.."

LOSS_RTOL="${LOSS_RTOL:-1e-3}"
UPDATE_RTOL="${UPDATE_RTOL:-1e-2}"
CHECK_PATIENTS="${CHECK_PATIENTS:-64}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU here: nvidia-smi is not installed (the NVIDIA driver is missing)" >&2
  exit 2
fi
if ! gpus="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)" || [ -z "$gpus" ]; then
  echo "gpu-check: no usable NVIDIA GPU here: nvidia-smi failed: ${gpus:-no GPU listed}" >&2
  exit 2
fi
echo "gpu-check: GPU: $gpus"

cargo build --release --features cuda --bin fedhcc
bin="${CARGO_TARGET_DIR:-target}/release/fedhcc"

run() { "$bin" bench train --model preop --json "$@"; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

echo "gpu-check: timing one 290-patient epoch of the preop model"
flex_time="$(run --backend flex)"
cuda_time="$(run --backend cuda)"
echo "  flex: $flex_time"
echo "  cuda: $cuda_time"

echo "gpu-check: agreement over $CHECK_PATIENTS patients, batch 8"
flex="$(run --backend flex --patients "$CHECK_PATIENTS" --batch 8)"
cuda="$(run --backend cuda --patients "$CHECK_PATIENTS" --batch 8)"
if ! python3 - "$flex" "$cuda" "$LOSS_RTOL" "$UPDATE_RTOL" <<'PY'
import json, sys
flex, cuda = json.loads(sys.argv[1]), json.loads(sys.argv[2])
loss_rtol, update_rtol = float(sys.argv[3]), float(sys.argv[4])
ok = flex["steps"] == cuda["steps"]
print(f"  steps        flex {flex['steps']}  cuda {cuda['steps']}")
for key, rtol in (("train_loss", loss_rtol), ("update_norm", update_rtol)):
    a, b = float(flex[key]), float(cuda[key])
    rel = abs(a - b) / max(abs(a), 1e-12)
    good = rel <= rtol
    ok = ok and good
    print(f"  {key:<12} flex {a:.7g}  cuda {b:.7g}  relative difference {rel:.2e} (limit {rtol:g}) {'ok' if good else 'TOO FAR'}")
sys.exit(0 if ok else 1)
PY
then
  echo "gpu-check: cuda and flex disagree" >&2
  exit 1
fi
echo "gpu-check: cuda and flex agree; cuda $(field "$cuda_time" samples_per_s) vs flex $(field "$flex_time" samples_per_s) patients/s"
