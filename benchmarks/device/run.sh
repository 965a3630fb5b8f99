#!/usr/bin/env bash
# One prepared GPU session for the lent GPU machine (15 minutes of device time in all, machine start included;
# 10 minutes a call; 64 MiB carried; no network; torch, torchvision, timm, CUDA, pytest, matplotlib, scipy there,
# not DALI, omegaconf or submitit). Everything it writes goes under $OUT (at most 8 files come back).
#
#   bash benchmarks/device/run.sh            # first call, ~6 min on a GPU: no DALI needed
#   bash benchmarks/device/run.sh dali       # second call, only if time is left: needs the DALI kit (wheels.py)
#
# Before the first call, here (a machine that reaches PyPI), the two pure-Python wheels the device lacks that
# this call needs (omegaconf for train.config, submitit for slurm/ and its tests; `.whl/` is git-ignored):
#
#   python -m pip download --no-deps --only-binary=:all: -d .whl/first omegaconf==2.4.0 submitit==1.5.4
#
# then the device tool's run with carry [".whl/first"], command `bash benchmarks/device/run.sh`, timeout_s 570
# (the caps below add up to 515 s; a typical first call takes ~6 min).
# Parts of the first call, each under its own time cap (seconds: CAP_ENV, CAP_TESTS, CAP_DENSE, CAP_TRAIN):
#
#   env         nvidia-smi (driver, GPU, memory), torch's build and its CUDA, cuDNN -> $OUT/env.json
#   tests       pytest -m gpu -k "not dali" tests/ (GPU-marked tests that need no DALI) -> $OUT/gpu_tests.xml
#   dense       python -m evaluate --protocol dense+multi-crop --multi-scale, bf16, on cuda: a random-weight
#               demo-recipe checkpoint on a small demo tree (the path, not the accuracy) -> $OUT/dense.json
#   train       benchmarks/train_throughput.py vgg16_bn, bf16 + channels_last, synthetic data and the PIL
#               DataLoader: images/s, MFU against a bf16 GEMM timed in the same run, peak memory, the largest
#               batch per GPU (--max-batch) -> $OUT/train_throughput.json
#
# and $OUT/summary.txt (one line a part: status, seconds, the figures) and $OUT/log.txt (every part's output).
# Without CUDA (this script's CI smoke test, any CPU machine) every part that needs it is skipped and says so;
# the script still writes env.json and the summary and exits 0. DEVICE_RUN_ON_CPU=1 runs the GPU parts on the
# CPU anyway, shrunk (train_throughput.py --smoke), to try the script's commands without a GPU (~3 min on 2
# cores). Exit status: 0 when no part failed, 1 otherwise.
set -u
cd "$(dirname "$0")/../.."
MODE=${1:-first}
OUT=${OUT:-runs/device}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
LOG="$OUT/log.txt"
: >"$SUMMARY"
: >"$LOG"
FAILED=0
WORK=${DEVICE_WORK:-/tmp/device_run}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$SUMMARY"; }

# part NAME CAP_SECONDS COMMAND...: run under a time cap, output appended to log.txt, one summary line
part() {
    local name=$1 cap=$2
    shift 2
    local t0=$SECONDS rc
    echo "=== $name (cap ${cap}s): $*" >>"$LOG"
    timeout --signal=INT --kill-after=15 "$cap" "$@" >>"$LOG" 2>&1
    rc=$?
    local took=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        say "$name: ok (${took}s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        say "$name: TIME CAP ${cap}s reached (rc $rc)"
        FAILED=1
    else
        say "$name: FAILED rc $rc (${took}s; the end of log.txt says why)"
        FAILED=1
    fi
    return $rc
}

# The wheels carried for this call (omegaconf; and, after wheels.py's install, DALI's kit).
if ls .whl/first/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/first/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -f .whl/site/env.sh ]; then
    # shellcheck disable=SC1091
    . .whl/site/env.sh
fi

# ---------------------------------------------------------------------------------------------------- env
part env "${CAP_ENV:-60}" $PY - "$OUT/env.json" <<'PYEOF'
import json, platform, shutil, subprocess, sys

env = {"python": platform.python_version(), "machine": platform.machine()}
smi = shutil.which("nvidia-smi")
if smi:
    q = "driver_version,name,memory.total,compute_cap"
    r = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
    env["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    head = subprocess.run([smi], capture_output=True, text=True).stdout.splitlines()
    env["nvidia_smi_cuda"] = next((line.split("CUDA Version:")[1].strip(" |") for line in head if "CUDA Version" in line), None)
else:
    env["nvidia_smi"] = None
import torch

env["torch"] = torch.__version__
env["torch_cuda"] = torch.version.cuda
env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
env["cuda_available"] = torch.cuda.is_available()
if env["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    env["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
                  "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count()}
from importlib.metadata import PackageNotFoundError, version

for name in ("torchvision", "timm", "omegaconf", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "matplotlib",
             "scipy", "submitit", "pytest"):
    try:
        env[name] = version(name)
    except PackageNotFoundError:
        env[name] = None
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
PYEOF
RUN=0  # run the GPU parts: on CUDA, or on the CPU when asked (DEVICE_RUN_ON_CPU=1)
# read back from env.json: no second torch import
field() { $PY -c "import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]))" "$OUT/env.json" "$1" 2>>"$LOG"; }
if [ "$(field cuda_available)" = True ]; then
    CUDA=1
    RUN=1
    say "device: $(field gpu), driver/GPU: $(field nvidia_smi); torch $(field torch) (CUDA $(field torch_cuda))"
else
    CUDA=0
    if [ "${DEVICE_RUN_ON_CPU:-0}" = 1 ]; then
        RUN=1
        say "device: no CUDA; DEVICE_RUN_ON_CPU=1: the GPU parts run on the CPU, shrunk (their figures mean nothing)"
    else
        say "device: no CUDA (torch $(field torch), nvidia-smi: $(field nvidia_smi)): the GPU parts are skipped"
    fi
fi

# ------------------------------------------------------------------------------------------- first call
if [ "$MODE" = first ]; then
    if [ $RUN = 1 ]; then
        part tests "${CAP_TESTS:-180}" $PY -m pytest -q -m gpu -k "not dali" -p no:cacheprovider \
            --junitxml="$OUT/gpu_tests.xml" tests/
    else
        say "tests: skipped (no CUDA: the GPU-marked tests would all skip)"
    fi

    if [ $RUN = 1 ]; then
        per_class=$([ $CUDA = 1 ] && echo 8 || echo 1)  # 32 val images on the GPU, 4 on a CPU
        part dense "${CAP_DENSE:-90}" bash -c "
            $PY -m data_pipeline demo '$WORK/demo' --classes 4 --train-per-class 1 --val-per-class $per_class >/dev/null &&
            $PY - '$WORK/demo' '$WORK/demo.pth' <<'PYEOF'
import sys, torch
from train.config import load_config, to_dict
from train.models import build_model_from_config
cfg = load_config('demo', [f'data.root={sys.argv[1]}', 'model.num_classes=4'])
torch.manual_seed(0)
torch.save({'model': build_model_from_config(cfg.model).state_dict(), 'config': to_dict(cfg)}, sys.argv[2])
PYEOF
            $PY -m evaluate --checkpoint '$WORK/demo.pth' --protocol dense+multi-crop --multi-scale \
                --precision bf16 --channels-last --workers 2 --json '$OUT/dense.json'
            rc=\$?; [ \$rc -le 1 ]  # 1 = the reference verdict FAIL (random weights): the run itself worked
        "
    else
        say "dense: skipped (no CUDA; tests/test_fake_cuda.py runs it on a fake CUDA device in CI)"
    fi

    if [ $CUDA = 1 ]; then
        part train "${CAP_TRAIN:-240}" $PY benchmarks/train_throughput.py --arch vgg16_bn --precision bf16 \
            --channels-last --sources synthetic,torchvision --warmup 5 --steps 20 --max-batch 40 \
            --data "$WORK/bench_gpu" --out "$OUT/train_throughput.json" --readme "$WORK/train_throughput.md"
    elif [ $RUN = 1 ]; then
        part train "${CAP_TRAIN:-240}" $PY benchmarks/train_throughput.py --smoke --arch vgg11 --precision bf16 \
            --channels-last --sources synthetic,torchvision --max-batch 5 \
            --data "$WORK/bench_smoke" --out "$OUT/train_throughput.json" --readme "$WORK/train_throughput.md"
    else
        say "train: skipped (no CUDA; tests/test_benchmarks.py runs train_throughput.py --smoke on the CPU)"
    fi
fi

# ------------------------------------------------------------------------------------ DALI (second call)
if [ "$MODE" = dali ]; then
    if [ $CUDA = 0 ]; then
        say "dali: skipped (no CUDA)"
    elif ! $PY -c "import nvidia.dali" 2>>"$LOG"; then
        say "dali: skipped (no DALI: carry the kit with benchmarks/device/wheels.py first)"
    else
        part dali-tests "${CAP_TESTS:-240}" $PY -m pytest -q -m gpu -k dali -p no:cacheprovider \
            --junitxml="$OUT/dali_tests.xml" tests/
        part dali-train "${CAP_TRAIN:-240}" $PY benchmarks/train_throughput.py --arch vgg16_bn --precision bf16 \
            --channels-last --sources synthetic,dali,torchvision --warmup 5 --steps 20 \
            --data "$WORK/bench_gpu" --out "$OUT/train_throughput_dali.json" --readme "$WORK/train_throughput_dali.md"
    fi
fi

# ---------------------------------------------------------------------------------------------- summary
$PY - "$OUT" 2>>"$LOG" <<'PYEOF' | tee -a "$SUMMARY"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
for name in ("gpu_tests.xml", "dali_tests.xml"):
    if (out / name).exists():
        suite = ET.parse(out / name).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        a = suite.attrib
        print(f"{name}: {a['tests']} tests, {a['failures']} failed, {a['errors']} errors, {a['skipped']} skipped, {float(a['time']):.0f} s")
if (out / "dense.json").exists():
    d = json.loads((out / "dense.json").read_text())
    print(f"dense: {d['protocol']} Q={d['test_scales']} on {d['device']}, {d['n_images']} images, {d['images_per_s']:.1f} img/s")
for name in ("train_throughput.json", "train_throughput_dali.json"):
    if (out / name).exists():
        t = json.loads((out / name).read_text())
        print(f"{name}: bf16 GEMM {t['gemm_bf16']['tflops']:.0f} TFLOP/s")
        for row in t["results"]:
            for src, r in row["sources"].items():
                if "images_per_s" in r:
                    print(f"  {row['arch']} {src}: {r['images_per_s']:.0f} img/s, MFU {r.get('mfu', 0):.1%}, "
                          f"peak {r['peak_memory_gib']} GiB (batch {r['batch']})")
            m = row.get("max_batch_per_gpu")
            if m and "fits" in m:
                print(f"  {row['arch']} max batch per GPU: {m['fits']} fits, {m['fails']} does not ({m['seconds']} s)")
PYEOF
say "done: $MODE call, ${SECONDS}s; files in $OUT"
exit $FAILED
