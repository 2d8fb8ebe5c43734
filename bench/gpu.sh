#!/usr/bin/env bash
# ResNet-50 + 8192-8192-8192 training-step throughput on one GPU (H100/H200), per-GPU batch 256, in under 8 minutes:
# fp32 eager (the baseline), bf16, + channels_last, + torch.compile, + the real input path (JPEG decoding in loader
# processes, colour augmentations batched on the GPU). Prints images/s per GPU and the ratio to fp32 eager.
#   bash bench/gpu.sh            (from the repository root, with .venv or the training image's python)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
batch="${BATCH:-256}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
printf '%-24s %10s %7s\n' config images/s ratio
baseline=""
for config in fp32 bf16 bf16+cl bf16+cl+compile bf16+cl+compile+jpeg; do
    rate=$(timeout 150 "$python" bench/gpu_step.py --config "$config" --batch "$batch" "$@" | tail -1 | awk '{print $2}') \
        || rate="failed"
    if [ -z "$baseline" ]; then baseline="$rate"; fi
    ratio=$(python3 -c "print(f'{float(\"$rate\") / float(\"$baseline\"):.2f}')" 2>/dev/null || echo "-")
    printf '%-24s %10s %7s\n' "$config" "$rate" "$ratio"
done
