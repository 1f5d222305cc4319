#!/usr/bin/env bash
# One prepared GPU run (docs/gpu.md), about 10 minutes on one H200:
#   1. checks that what the suite imports is installed (installs wheels from $WHEELS_DIR if not),
#   2. runs the GPU tests (tests/gpu, @pytest.mark.gpu),
#   3. runs the Nexus/AdamW throughput A/B of benchmarks/throughput.py at gpt2_124m and llama_1b shapes,
#      in the default and in the exact mode, appending JSON lines to $RESULTS_DIR/gpu_suite.jsonl,
#   4. prints a summary (tests, tokens/s, ratio, MFU, extra peak memory in fp32 parameter copies).
#
# Usage (from anywhere; it works in the repository it lives in):
#   benchmarks/gpu_suite.sh            # on the GPU machine
#   benchmarks/gpu_suite.sh --tiny     # rehearsal on CPU: tiny shapes, a few steps, results to a temp dir
# Environment:
#   PYTHON        interpreter (default: .venv/bin/python if it exists, else python3)
#   WHEELS_DIR    a folder of wheels installed with `pip install --no-deps` when an import is missing
#   RESULTS_DIR   where JSON lines go (default benchmarks/results; with --tiny a fresh temp dir)
#   BUDGET_S      stop starting new steps after this many seconds (default 540: leaves time for the summary)
#   PEAK_FLOPS    dense peak FLOP/s for MFU (default 989e12 on H100/H200 bf16; else Lightning's table)
#   SKIP_TESTS=1, SKIP_EXACT=1   leave out the GPU tests / the exact-mode A/B
#   ONLY_MODEL    run the A/B for this one model only (gpt:gpt2_124m, llama:1b; with --tiny gpt:tiny, llama:tiny)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TINY=0
for arg in "$@"; do
    case "$arg" in
        --tiny) TINY=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $arg (expected --tiny)" >&2; exit 2 ;;
    esac
done
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
BUDGET_S="${BUDGET_S:-540}"
START=$SECONDS
if [[ $TINY == 1 ]]; then RESULTS_DIR="${RESULTS_DIR:-$(mktemp -d)}"; else RESULTS_DIR="${RESULTS_DIR:-$ROOT/benchmarks/results}"; fi
mkdir -p "$RESULTS_DIR"
RESULTS="$RESULTS_DIR/gpu_suite.jsonl"
touch "$RESULTS"
FIRST_LINE=$(( $(wc -l < "$RESULTS") + 1 ))  # the summary reads what this run appends
RUN_ID="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "[gpu_suite] $RUN_ID python=$PYTHON results=$RESULTS tiny=$TINY budget=${BUDGET_S}s"

# ---------------------------------------------------------------- 1. imports
missing() {
    "$PYTHON" - <<'EOF'
import importlib.util
need = ["torch", "lightning", "torchmetrics", "typing_extensions", "yaml", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
}
MISSING="$(missing)"
if [[ -n "$MISSING" && -n "${WHEELS_DIR:-}" ]]; then
    echo "[gpu_suite] missing: $MISSING; installing the wheels in $WHEELS_DIR (--no-deps)"
    "$PYTHON" -m pip install --no-deps --no-index "$WHEELS_DIR"/*.whl || true
    MISSING="$(missing)"
fi
if [[ -n "$MISSING" ]]; then
    echo "[gpu_suite] cannot run: missing Python packages: $MISSING (carry their wheels and set WHEELS_DIR)" >&2
    exit 3
fi
# the recipes folder installs as lightning_nexus_recipes; without an install, a link on PYTHONPATH does it
SHIM="$(mktemp -d)"
export PYTHONPATH="$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import lightning_nexus_recipes" 2>/dev/null; then
    ln -s "$ROOT/recipes" "$SHIM/lightning_nexus_recipes"
fi
"$PYTHON" -c "import lightning_nexus, lightning_nexus_recipes" || { echo "[gpu_suite] the package does not import" >&2; exit 3; }
HAS_CUDA="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')"
if [[ $TINY == 0 && $HAS_CUDA != 1 ]]; then
    echo "[gpu_suite] no CUDA device: run it on the GPU machine, or rehearse with --tiny" >&2
    exit 4
fi
if [[ -z "${PEAK_FLOPS:-}" && $HAS_CUDA == 1 ]]; then
    # Lightning's table lists H100/H200 at the sparse bf16 peak; MFU is quoted against the dense one
    PEAK_FLOPS="$("$PYTHON" -c 'import torch; n = torch.cuda.get_device_name(); print("989e12" if ("H100" in n or "H200" in n) else "")')"
fi
"$PYTHON" - <<EOF >> "$RESULTS"
import json, platform, torch, lightning
info = {"benchmark": "gpu_suite", "run": "$RUN_ID", "step": "environment", "tiny": bool($TINY),
        "torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
print(json.dumps(info))
EOF

left() { echo $(( BUDGET_S - (SECONDS - START) )); }

# ---------------------------------------------------------------- 2. GPU tests
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    JUNIT="$RESULTS_DIR/gpu_tests_$$.xml"
    T0=$SECONDS
    timeout $(( $(left) > 60 ? $(left) : 60 )) "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/gpu --junitxml="$JUNIT"
    TESTS_RC=$?
    "$PYTHON" - "$JUNIT" "$TESTS_RC" $(( SECONDS - T0 )) <<EOF >> "$RESULTS"
import json, sys, xml.etree.ElementTree as ET
path, rc, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
record = {"benchmark": "gpu_suite", "run": "$RUN_ID", "step": "gpu_tests", "rc": rc, "seconds": seconds}
try:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    for key in ("tests", "failures", "errors", "skipped"):
        record[key] = int(suite.get(key, 0))
    record["failed"] = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError) as err:
    record["junit_error"] = str(err)
print(json.dumps(record))
EOF
fi

# ---------------------------------------------------------------- 3. throughput A/B
if [[ $TINY == 1 ]]; then
    DEVICE=cpu; PRECISION=32-true; COMPILE=""
    SHAPES=("gpt:tiny|--batch-size 2 --block 64 --steps 2 --warmup-steps 1 --repeats 1|--repeats 1"
            "llama:tiny|--batch-size 2 --block 64 --steps 2 --warmup-steps 1 --repeats 1|--repeats 1")
else
    DEVICE=cuda; PRECISION=bf16-mixed; COMPILE="--compile"
    # the recipes' shapes (benchmarks/RESULTS.md): gpt2_124m 16x1024 tokens per micro-batch, llama_1b 4x2048.
    # Exact mode: fewer rounds (it is the
    # memory and per-micro-batch cost of one more buffer that we want to see, not a tight ratio)
    SHAPES=("gpt:gpt2_124m|--batch-size 16 --block 1024 --steps 10 --warmup-steps 3 --repeats 3|--repeats 2"
            "llama:1b|--batch-size 4 --block 2048 --steps 8 --warmup-steps 2 --repeats 2|--repeats 1")
fi
PEAK_ARG=(); [[ -n "${PEAK_FLOPS:-}" ]] && PEAK_ARG=(--peak-flops "$PEAK_FLOPS")
for entry in "${SHAPES[@]}"; do
    IFS='|' read -r MODEL ARGS EXACT_REPEATS <<< "$entry"
    [[ -n "${ONLY_MODEL:-}" && "$MODEL" != "$ONLY_MODEL" ]] && continue
    for MODE in default exact; do
        [[ $MODE == exact && "${SKIP_EXACT:-0}" == 1 ]] && continue
        if (( $(left) < 30 )); then
            echo "[gpu_suite] budget spent: skipping $MODEL $MODE" >&2
            echo "{\"benchmark\": \"gpu_suite\", \"run\": \"$RUN_ID\", \"step\": \"skipped\", \"model\": \"$MODEL\", \"mode\": \"$MODE\"}" >> "$RESULTS"
            continue
        fi
        EXTRA=(); [[ $MODE == exact ]] && EXTRA=(--exact $EXACT_REPEATS)
        echo "[gpu_suite] throughput $MODEL ($MODE), $(left)s left"
        # shellcheck disable=SC2086  # ARGS is a word list by design
        timeout "$(left)" "$PYTHON" -m benchmarks.throughput --model "$MODEL" --device "$DEVICE" --precision "$PRECISION" \
            $COMPILE $ARGS "${EXTRA[@]}" "${PEAK_ARG[@]}" --accumulate 4 --loop lightning --json "$RESULTS" \
            || echo "{\"benchmark\": \"gpu_suite\", \"run\": \"$RUN_ID\", \"step\": \"failed\", \"model\": \"$MODEL\", \"mode\": \"$MODE\"}" >> "$RESULTS"
    done
done

# ---------------------------------------------------------------- 4. summary
"$PYTHON" - "$RESULTS" "$RUN_ID" "$FIRST_LINE" <<'EOF'
import json, sys
path, run, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
mine = [json.loads(line) for line in open(path).readlines()[first - 1 :] if line.strip()]
print(f"\n== gpu_suite {run} ({path}) ==")
for r in mine:
    if r.get("step") == "environment":
        print(f"device {r['device']}, torch {r['torch']}, lightning {r['lightning']}, cuda {r['cuda']}")
    elif r.get("step") == "gpu_tests":
        print(f"GPU tests: {r.get('tests')} collected, {r.get('failures')} failed, {r.get('errors')} errors, "
              f"{r.get('skipped')} skipped, {r['seconds']} s (rc {r['rc']}) {r.get('failed') or ''}")
    elif r.get("step") in ("skipped", "failed"):
        print(f"throughput {r['model']} {r['mode']}: {r['step'].upper()}")
    elif r.get("benchmark") == "throughput":
        arms, ratio = r["arms"], r["ratios"]["lightning"]
        mode = "exact" if r["args"].get("exact") else "default"
        mfu = arms["lightning/nexus"]["mfu"]
        mem = ratio["peak_mem_diff_over_fp32_params"]
        print(f"{r['model']['spec']:<14} {mode:<7} adamw {arms['lightning/adamw']['tokens_per_s']:>10,.0f} tok/s  "
              f"nexus {arms['lightning/nexus']['tokens_per_s']:>10,.0f} tok/s  ratio {ratio['throughput_nexus_over_adamw']:.4f}  "
              f"MFU {'n/a' if mfu is None else f'{mfu:.3f}'}  extra peak {'n/a' if mem is None else f'{mem:.2f}'} fp32 copies")
EOF
echo "[gpu_suite] done in $(( SECONDS - START )) s"
rm -rf "$SHIM"
