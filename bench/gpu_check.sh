#!/usr/bin/env bash
# GPU self-check (bench/gpu_check.py): bf16 forward passes of llama.py and phi.py against fp32 and
# transformers, LoRA and MUSCLE training steps against transformers + PEFT (tokens/s, memory,
# MFU), and the toy pipeline under torchrun --device cuda. At most 10 minutes on one GPU; the
# results go into bench/RESULTS.md with the card's name and the date; the exit status is non-zero,
# with the failed parts named on the last line, when any part fails.
#
#   bash bench/gpu_check.sh              # needs one CUDA GPU and the CUDA build of torch
#   bash bench/gpu_check.sh --dry-run    # every part on the CPU on tiny shapes (the test suite)
set -uo pipefail
cd "$(dirname "$0")/.."
# gpu_check.py stops itself earlier (its LIMIT_S) and names the part it stopped; this limit ends a
# process stuck where Python cannot take the signal (inside a CUDA call).
LIMIT_S=600
timeout --kill-after=30 "$LIMIT_S" python bench/gpu_check.py "$@"
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "gpu_check: FAILED: stopped after $LIMIT_S s; the parts finished before are in the results" >&2
fi
exit "$status"
