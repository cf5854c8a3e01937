#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one command, on a CUDA machine with the dev extras installed
# (torchattacks included) and no network: every model and all data are built here.
#
#     bash bench/gpu.sh [OUTPUT.md]        # default: bench-gpu-<date>.md in the current folder
#
# It runs, each in fp32, in bf16 and compiled (bf16 + --compile on):
#   * the AutoAttack standard composite against torchattacks' chained members (bench_autoattack.py) on the
#     bundled digits CNN and on the CIFAR-shaped ResNet-20 (32x32 upscaled digits, trained here);
#   * PGD-10 end to end against torchattacks (bench_end_to_end.py, digits tiled to 54,000 images);
# and the ReID metrics and re-ranking at Market-1501's size (bench_reid.py). Every table names the device.
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-bench-gpu-$(date +%Y-%m-%d).md}"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these are the GPU rows')"

run() {
    echo "### \`python bench/$*\`" >>"$out"
    echo >>"$out"
    python3 "$@" 2>>"$out.log" | grep -v '^W[0-9]' >>"$out"
    echo >>"$out"
}

: >"$out"
for settings in "--precision fp32" "--precision bf16" "--precision bf16 --compile on"; do
    # shellcheck disable=SC2086
    run bench_autoattack.py --device cuda --model digits --images 300 --batch-size 300 $settings
    # shellcheck disable=SC2086
    run bench_autoattack.py --device cuda --model resnet20 --images 300 --batch-size 300 --epochs 10 $settings
done
run bench_end_to_end.py --device cuda --model digits --tile 100 --batch-size 1024
run bench_reid.py --device cuda
echo "written: $out (stderr in $out.log)"
