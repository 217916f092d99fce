#!/usr/bin/env bash
# The GPU host's runs for the many-frontends issue (16 cores + one NVIDIA GPU, through the `device`
# tool from the repository root), each part under the device's 10 minutes:
#   scripts/gpu_frontends.sh scale   the tiny model's scaling over frontends against 8 bare
#                                    SO_REUSEPORT processes (load_tests/bench_scale.py)
#   scripts/gpu_frontends.sh 1|8     ResNet-50 fp16 + torch.compile over plain gRPC (FP32 and UINT8
#                                    input, c=64, 16 client connections) with --frontends 1 or 8
# Results go to load_tests/results (or $OUT).
set -u
out=${OUT:-load_tests/results}
mkdir -p "$out"
for part in "$@"; do
    if [ "$part" = scale ]; then
        python3 -m load_tests.bench_scale --frontends 1,8 --bare 8 --instances 8 --procs 8 --conc 8 --rounds 2 \
            --duration 6 --json "$out/bench_scale.json" 2>&1 | tail -20
    else
        python3 -m load_tests.bench_pytorch_gpu --models resnet50_fp16_compiled,resnet50_fp16_compiled_u8 \
            --concurrency 64 --no-ceiling --frontends "$part" --connections 16 --duration 8 \
            --name "bench_pytorch_gpu_frontends$part" --out-dir "$out" 2>&1 | grep -E "GPU|c=64|ready in|rror" | cut -c1-240
    fi
done
