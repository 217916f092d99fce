#!/usr/bin/env bash
# The GPU host's runs for the many-frontends issue (16 cores + one NVIDIA GPU, through the `device`
# tool from the repository root), each part well under the device's 10 minutes:
#   scripts/gpu_frontends.sh scale    the tiny model's scaling over frontends against 8 bare
#                                     SO_REUSEPORT processes (load_tests/bench_scale.py)
#   scripts/gpu_frontends.sh resnet   ResNet-50 fp16 + torch.compile over plain gRPC, FP32 and UINT8
#                                     input, c=64, from several client processes, with --frontends 8
#                                     and then --frontends 1 (the second compiles from the first's cache)
# Results go to load_tests/results (or $OUT). INSTANCES, CLIENTS, CONNECTIONS, ROUNDS, DURATION, SIZES
# (compile batch sizes) override the defaults.
set -u
out=${OUT:-load_tests/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for part in "$@"; do
    case "$part" in
    scale)
        python3 -m load_tests.bench_scale --frontends 1,8 --bare 8 --instances 8 --procs 8 --conc 8 --rounds "${ROUNDS:-2}" \
            --duration "${DURATION:-6}" --json "$out/bench_scale.json" 2>&1 | tail -20
        ;;
    resnet)
        python3 -m load_tests.bench_pytorch_gpu --models resnet50_fp16_compiled,resnet50_fp16_compiled_u8 \
            --concurrency 64 --no-ceiling --frontends 8,1 --instances "${INSTANCES:-4}" \
            --client-processes "${CLIENTS:-4}" --connections "${CONNECTIONS:-4}" --request-batch 1 \
            --compile-batch-sizes "${SIZES:-1,8,16,32,64}" --duration "${DURATION:-8}" --warmup 3 \
            --name bench_pytorch_gpu_frontends --out-dir "$out" 2>&1 | grep -vE "executions by batch size" | cut -c1-300
        ;;
    *)
        echo "unknown part '$part' (scale, resnet)" >&2
        exit 2
        ;;
    esac
done
