#!/usr/bin/env bash
# The one prepared command for a session that has a GPU (issue 9). Three parts, each under its own time
# limit (about 8 minutes together), every log teed into $OUT (the device tool brings $OUT back):
#   1. python -m pytest -q -m cuda tests          the CUDA-marked tests                      (limit 75 s)
#   2. python -m pytest -q -m "not cuda" tests    the rest of the suite, on the GPU machine  (limit 120 s)
#   3. python bench/gpu.py --json $OUT/gpu.json    the 7B benchmark, short table last         (limit 270 s)
#
# Here first (no GPU needed), once per checkout:
#     bash bench/run_device.sh --prepare
# copies into .whl/site (git-ignored, so it travels only when carried) what the device image lacks:
# bitsandbytes for the baseline (trimmed to the one CUDA library that image's torch loads, ~5 MB instead of
# 125 MB) and gguf for the suite. Then the device tool:
#     run(command="bash bench/run_device.sh", carry=[".whl"], timeout_s=560)
# Without a device the script still runs (the bench falls back to its tiny CPU shape): a dry run of itself.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    # Which interpreter has each package installed (refvenv: transformers/peft/bitsandbytes; .venv: gguf),
    # and which of bitsandbytes' CUDA libraries to keep: the device's torch is a CUDA 13.0 build.
    BNB_PYTHON=${BNB_PYTHON:-/work/refvenv/bin/python}
    GGUF_PYTHON=${GGUF_PYTHON:-.venv/bin/python}
    BNB_CUDA=${BNB_CUDA:-130}
    rm -rf .whl/site && mkdir -p .whl/site || exit 1
    copy_pkg='
import importlib.metadata, importlib.util, pathlib, shutil, sys
name, dest, keep_lib = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
spec = importlib.util.find_spec(name)
if spec is None:
    sys.exit(f"--prepare: {name} is not installed for {sys.executable}; install it there or set the *_PYTHON variable")
src = pathlib.Path(spec.origin).parent
def ignore(folder, names):  # bytecode, and every native library but the one the device loads
    return [n for n in names if n == "__pycache__" or (n.startswith("lib" + name + "_") and n != keep_lib)]
shutil.copytree(src, dest / name, ignore=ignore)
dist = importlib.metadata.distribution(name)  # transformers checks the version through the metadata
shutil.copytree(dist._path, dest / dist._path.name)
print(f"{name} {dist.version}: {src} -> {dest / name}")
'
    "$BNB_PYTHON" -c "$copy_pkg" bitsandbytes .whl/site "libbitsandbytes_cuda${BNB_CUDA}.so" || exit 1
    "$GGUF_PYTHON" -c "$copy_pkg" gguf .whl/site none || exit 1
    du -sh .whl
    exit 0
fi

OUT=${OUT:-$PWD/bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
# Carried packages: a prepared site folder, and/or wheels (installed the way the device README says).
if [ -d .whl/site ]; then export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"; fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF'
import importlib
try:
    import torch
except ImportError:
    raise SystemExit("torch is not importable: the device image should have a CUDA build (KINDS.md); a CUDA "
                     "torch wheel is far over the 64 MiB a call may carry, so it cannot be brought along")
print(f"torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name} cc {p.major}.{p.minor} {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
for name in ("transformers", "peft", "bitsandbytes", "accelerate", "gguf", "safetensors", "tokenizers",
             "huggingface_hub", "jinja2", "pyarrow", "tqdm", "numpy", "triton"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name} NOT IMPORTABLE: {e!r}"[:200])
EOF
} 2>&1 | tee "$OUT/env.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

timeout -k 10 75 "$PY" -m pytest -q -rfEs -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/pytest_cuda.log"
rc_cuda=${PIPESTATUS[0]}
timeout -k 10 120 "$PY" -m pytest -q -rfE -p no:cacheprovider -m "not cuda" tests 2>&1 | tee "$OUT/pytest_rest.log"
rc_rest=${PIPESTATUS[0]}
timeout -k 10 270 "$PY" bench/gpu.py --json "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
rc_bench=${PIPESTATUS[0]}

echo "== run_device.sh exit codes (124: hit its time limit): pytest -m cuda $rc_cuda, rest $rc_rest, bench $rc_bench"
tail -n 3 "$OUT/pytest_cuda.log" | sed 's/^/  cuda tests: /'
tail -n 3 "$OUT/pytest_rest.log" | sed 's/^/  rest:       /'
# the bench's table again, so it is the last thing the reply shows
sed -n '/^== bench\/gpu.py/,$p' "$OUT/bench.log"
[ "$rc_cuda" = 0 ] && [ "$rc_rest" = 0 ] && [ "$rc_bench" = 0 ]
