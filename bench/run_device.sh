#!/usr/bin/env bash
# The one prepared command for a machine with a GPU: the whole test suite and the GPU benchmarks in one call
# of at most 8 minutes. Each part runs under its own time limit and tees its log into $OUT (the device tool
# brings $OUT back; at most 8 files, so exactly these 7):
#   env.log                       GPU, driver, torch, and which packages import
#   pytest_cuda.log, pytest_rest.log   python -m pytest -m cuda / -m "not cuda" tests, side by side (limit 100 s)
#   bench.log, gpu.json           python bench/gpu.py, the 7B story (limit 210 s, --budget-s 185)
#   context.log, context.json     python bench/gpu.py --only context, longest context under 24 GiB (limit 145 s)
# The limits can be changed with LIMIT_TESTS, LIMIT_BENCH and LIMIT_CONTEXT (seconds), the parts run with
# PARTS (default tests,bench,context); the tables come last, printed again from the JSON.
#
# Here first (no GPU needed), once per checkout, from any environment that has bitsandbytes installed:
#     bash bench/run_device.sh --prepare
# copies into .whl/site (git-ignored, so it travels only when carried) what the device image lacks:
# bitsandbytes for the baseline rows, trimmed to the native library for the device's CUDA 13.0 torch
# (libbitsandbytes_cuda130.so, ~4 MB of its ~125 MB) plus the CPU one, and gguf for the suite. bitsandbytes
# is looked for in the current python (${PYTHON:-python3}: an activated venv), then in $BNB_PYTHON; gguf in
# the current python, then $GGUF_PYTHON. BNB_CUDA=132 keeps another CUDA build's library. Then the device tool:
#     run(command="bash bench/run_device.sh", carry=[".whl"], timeout_s=540)
# Without a GPU the script still runs (the bench falls back to its tiny CPU shape): a dry run of itself.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# which of the given interpreters has `name` installed: the first that does, or nothing
find_python() {
    local name=$1; shift
    for candidate in "$@"; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
        if "$candidate" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$name') is None)" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [ "${1:-}" = "--prepare" ]; then
    BNB_CUDA=${BNB_CUDA:-130}
    bnb_python=$(find_python bitsandbytes "$PY" "${BNB_PYTHON:-}") || {
        echo "--prepare: bitsandbytes is not installed for $(command -v "$PY" || echo "$PY")${BNB_PYTHON:+ nor for $BNB_PYTHON}." >&2
        echo "  Activate an environment that has it (pip install bitsandbytes), or point BNB_PYTHON at its python:" >&2
        echo "  BNB_PYTHON=/path/to/venv/bin/python bash bench/run_device.sh --prepare" >&2
        exit 1
    }
    gguf_python=$(find_python gguf "$PY" "${GGUF_PYTHON:-}") || gguf_python=""
    rm -rf .whl/site.new && mkdir -p .whl/site.new || exit 1  # swapped in once complete
    # copy one installed package (and its dist-info: transformers checks bitsandbytes' version through the
    # metadata), leaving out bytecode and every native library of the package but the ones named to keep
    copy_pkg='
import importlib.metadata, importlib.util, pathlib, shutil, sys
name, dest, keep = sys.argv[1], pathlib.Path(sys.argv[2]), set(sys.argv[3:])
src = pathlib.Path(importlib.util.find_spec(name).origin).parent
libs = sorted(p.name for p in src.glob(f"lib{name}_*"))
missing = [k for k in keep if k not in libs]
if libs and missing:
    sys.exit(f"--prepare: {src} has no {missing[0]} (it has {libs}); another bitsandbytes version, or BNB_CUDA=..., "
             "picks one the device can load (its torch is a CUDA 13.0 build)")
def ignore(folder, names):
    return [n for n in names if n == "__pycache__" or n.endswith(".pyc") or (n.startswith(f"lib{name}_") and n not in keep)]
shutil.copytree(src, dest / name, ignore=ignore)
dist = importlib.metadata.distribution(name)
shutil.copytree(dist._path, dest / pathlib.Path(dist._path).name)
kept = sorted(keep & set(libs)) or ["none"]
print(f"{name} {dist.version} from {src} ({sys.executable}) -> {dest / name}; native libraries kept: {kept}")
'
    "$bnb_python" -c "$copy_pkg" bitsandbytes .whl/site.new "libbitsandbytes_cuda${BNB_CUDA}.so" libbitsandbytes_cpu.so || exit 1
    if [ -n "$gguf_python" ]; then
        "$gguf_python" -c "$copy_pkg" gguf .whl/site.new || exit 1
    else
        echo "--prepare: warning: gguf is not installed for $PY${GGUF_PYTHON:+ nor $GGUF_PYTHON}; the device image" \
             "lacks it too, so the suite's GGUF tests will fail there (pip install gguf, or set GGUF_PYTHON)" >&2
    fi
    rm -rf .whl/site && mv .whl/site.new .whl/site || exit 1
    if git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q .whl/site; then
        echo "--prepare: warning: .whl is not git-ignored; add /.whl/ to .gitignore or .git/info/exclude" >&2
    fi
    du -sh .whl/site
    echo 'now: run(command="bash bench/run_device.sh", carry=[".whl"], timeout_s=540)'
    exit 0
fi

OUT=${OUT:-$PWD/bench/out}
mkdir -p "$OUT"
LIMIT_TESTS=${LIMIT_TESTS:-100}
LIMIT_BENCH=${LIMIT_BENCH:-210}
LIMIT_CONTEXT=${LIMIT_CONTEXT:-145}
PARTS=${PARTS:-tests,bench,context}  # a rerun of some parts only: PARTS=bench,context
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
# Carried packages: the prepared site folder, and/or wheels (installed the way the device README says).
if [ -d .whl/site ]; then export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"; fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    date -u
    [ -d .whl/site ] || echo "no .whl/site: bitsandbytes' rows will say 'not installed' unless the image has it" \
                            "(here: bash bench/run_device.sh --prepare; then carry=[\".whl\"])"
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
             "huggingface_hub", "jinja2", "pyarrow", "tqdm", "numpy", "triton", "xdist"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')} {getattr(mod, '__file__', '')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name} NOT IMPORTABLE: {e!r}"[:200])
EOF
} 2>&1 | tee "$OUT/env.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

# The two halves of the suite side by side (neither is timed); pytest-xdist spreads each over cores if present.
xdist_cuda="" xdist_rest=""
if "$PY" -c "import xdist" 2>/dev/null; then
    cores=$(nproc 2>/dev/null || echo 2)
    # tests spread one by one (--dist load): the long ones (2-process torchrun tests, ~30-40 s each on a 2-core
    # machine; the tiny bench's module fixture, ~40 s) land on different workers
    if [ "$cores" -ge 8 ]; then xdist_cuda="-n 4 --dist load" xdist_rest="-n $((cores / 2)) --dist load"; fi
fi
rc_cuda=skipped rc_rest=skipped rc_bench=skipped rc_context=skipped
if [[ ",$PARTS," == *,tests,* ]]; then
    timeout -k 10 "$LIMIT_TESTS" "$PY" -m pytest -q -rfEs -p no:cacheprovider --durations=10 $xdist_cuda -m cuda \
        tests >"$OUT/pytest_cuda.log" 2>&1 &
    pid_cuda=$!
    timeout -k 10 "$LIMIT_TESTS" "$PY" -m pytest -q -rfE -p no:cacheprovider --durations=10 $xdist_rest \
        -m "not cuda" tests >"$OUT/pytest_rest.log" 2>&1 &
    pid_rest=$!
    wait "$pid_cuda"; rc_cuda=$?
    wait "$pid_rest"; rc_rest=$?
fi
if [[ ",$PARTS," == *,bench,* ]]; then
    timeout -k 10 "$LIMIT_BENCH" "$PY" bench/gpu.py --json "$OUT/gpu.json" --budget-s $((LIMIT_BENCH - 25)) 2>&1 \
        | grep --line-buffered -v '^USDT:' | tee "$OUT/bench.log"
    rc_bench=${PIPESTATUS[0]}
fi
if [[ ",$PARTS," == *,context,* ]]; then
    timeout -k 10 "$LIMIT_CONTEXT" "$PY" bench/gpu.py --only context --json "$OUT/context.json" \
        --budget-s $((LIMIT_CONTEXT - 25)) 2>&1 | grep --line-buffered -v '^USDT:' | tee "$OUT/context.log"
    rc_context=${PIPESTATUS[0]}
fi

echo "== run_device.sh exit codes (124: hit its time limit): pytest -m cuda $rc_cuda, rest $rc_rest," \
     "bench $rc_bench, context $rc_context"
grep -sE "^(FAILED|ERROR) " "$OUT/pytest_cuda.log" "$OUT/pytest_rest.log" | head -n 20
for part in cuda rest; do  # (a log cut by its time limit may end without a newline)
    [ -f "$OUT/pytest_$part.log" ] && { tail -n 2 "$OUT/pytest_$part.log" | sed "s/^/  $part tests: /"; echo; }
done
# the tables again, from the JSON (there even when a part was cut by its limit), last in the reply
for part in gpu context; do
    [ -s "$OUT/$part.json" ] && "$PY" bench/gpu.py --report "$OUT/$part.json" 2>&1 | grep -v '^USDT:'
done
for rc in "$rc_cuda" "$rc_rest" "$rc_bench" "$rc_context"; do [ "$rc" = 0 ] || [ "$rc" = skipped ] || exit 1; done
