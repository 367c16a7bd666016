#!/usr/bin/env bash
# The GPU pass (issue 8) as whole device commands: build there, run the test suite with the GPU
# present (the GPU files first), compute-sanitizer over the CUDA kernels' tests, the benchmarks.
#
# A lent machine has 15 device minutes per session, at most 10 per command, the start included;
# so the stages come in two calls of about 8 and 5 minutes, through the device tool's `run`:
#
#   STAGES="env build tests sanitizer" bash benchmarks/gpu_pass.sh      # timeout_s 540
#   STAGES="build bench" bash benchmarks/gpu_pass.sh                    # timeout_s 360 (build: a no-op
#                                                                       # when the machine is still warm)
#
# Every stage runs under its own time limit (LIMIT_<stage> seconds, below) so that a slow one
# cannot eat the next; what it printed goes to its log. At the end the logs, the tests' JUnit XML
# and the benchmarks' JSON / PNG are packed into $OUT/gpu_pass.tar.gz, and a summary table (stage,
# exit status, seconds, the pytest or sanitizer tally) is printed last and written to
# $OUT/gpu_pass_summary.txt. Unpack the tarball under benchmarks/results/ to commit what holds.
# Without a GPU (here, CI) the stages still run and say so: the script is checked by
# `STAGES=env bash benchmarks/gpu_pass.sh` anywhere.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d)}
STAGES=${STAGES:-"env build tests sanitizer bench"}
W=$(mktemp -d)/gpu_pass
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1
: "${LIMIT_env:=30}" "${LIMIT_build:=200}" "${LIMIT_tests:=200}" "${LIMIT_memcheck:=90}" "${LIMIT_racecheck:=45}"
: "${LIMIT_bench_attention:=90}" "${LIMIT_bench_denoiser:=70}" "${LIMIT_bench_end_to_end:=120}" \
  "${LIMIT_bench_mar:=50}"
# the benchmarks' arguments, cut to fit the limits above (a guess until a first GPU run times them:
# widen them, or run a benchmark alone, when the device time allows)
ATTN_ARGS=${ATTN_ARGS:-"--groups self padded cross causal decode"}
DEN_ARGS=${DEN_ARGS:-""}
E2E_ARGS=${E2E_ARGS:-"--models fluid-166m --rounds 2"}
MAR_ARGS=${MAR_ARGS:-"--models mar_base --rounds 2"}
SUMMARY=()

# run_stage NAME LIMIT_S COMMAND...: the command under `timeout`, its output in $W/NAME.log
run_stage() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "[gpu_pass] $name (limit ${limit}s)" >&2
    timeout -k 5 "$limit" "$@" >"$W/$name.log" 2>&1
    local rc=$?
    local tally
    tally=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)|(passed|failed|skipped|error).* in [0-9.]+s" "$W/$name.log" \
            | tail -n 1 | sed 's/=//g')
    [ -z "$tally" ] && tally=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$W/$name.log" | tail -n 1)
    [ "$rc" = 124 ] && tally="TIMED OUT after ${limit}s; $tally"
    SUMMARY+=("$(printf '%-22s rc=%-4s %5ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$tally")")
    return $rc
}

has_stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

have_gpu() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

# the files that hold GPU tests (or cuda params), run first so a timeout still leaves their results
GPU_TESTS="tests/test_attention_cuda.py tests/test_cuda_head.py tests/test_attention_triton.py
  tests/test_triton_head.py tests/test_ddpm.py tests/test_categorical.py tests/test_denoiser.py
  tests/test_diffusion.py tests/test_diffusion_loss.py tests/test_sampling_graph.py tests/test_backend.py"
# the CUDA kernels' own tests, for the sanitizer (memcheck: all of them; racecheck, which is far
# slower, on the shared-memory kernels: attention forward + backward and the head's GEMMs)
CUDA_TESTS="tests/test_attention_cuda.py tests/test_cuda_head.py tests/test_ddpm.py tests/test_categorical.py"
RACE_K=${RACE_K:-"padding_tiles or fully_masked or kvcache_decode or plain_gemm or head_forward_matches"}

if has_stage env; then
    run_stage env "$LIMIT_env" bash -c "date -u; uname -a; nvidia-smi || echo 'no nvidia-smi'; \
        $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; \
        $PY -c 'import triton; print(\"triton\", triton.__version__)' || true; \
        nvcc --version | tail -n 2 || true; command -v compute-sanitizer ncu || true; nproc; git log -1 --oneline || true"
fi

if has_stage build; then
    # built here before (a warm machine keeps the editable install) and able to run on this GPU
    if "$PY" -c "import fluid_ops._C_cuda as m, sys; sys.exit(0 if m.device_status()[0] > 0 else 1)" 2>/dev/null \
            && [ -z "${REBUILD:-}" ]; then
        SUMMARY+=("$(printf '%-22s %s' build "already built on this machine (REBUILD=1 to redo)")")
    else
        # Hopper only (one arch: a quarter of the default build's nvcc work); no registry there, so
        # no build isolation and no dependency resolution (torch, numpy, tqdm, ... are in the image)
        run_stage build "$LIMIT_build" env FLUID_OPS_CUDA=1 FLUID_OPS_CUDA_ARCHS="${ARCHS:-90a-real}" \
            FLUID_OPS_BUILD_JOBS="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
        run_stage build_check 60 "$PY" -c "import fluid_ops, fluid_ops._C_cuda as m; \
print({k: v['available'] for k, v in fluid_ops.backends().items()}); print(m.device_status(), m.compiled_archs)"
    fi
fi

if has_stage tests; then
    have_gpu || echo "[gpu_pass] torch sees no GPU: the GPU tests will skip" >&2
    # -v: one line per test in the log, so a run cut off by its limit still shows what passed
    # shellcheck disable=SC2086
    run_stage tests "$LIMIT_tests" "$PY" -m pytest -v -rfEs -p no:cacheprovider --durations=25 \
        --junitxml="$W/tests.xml" ${TEST_PATHS:-$GPU_TESTS tests}
fi

if has_stage sanitizer; then
    if command -v compute-sanitizer >/dev/null && have_gpu; then
        # shellcheck disable=SC2086
        run_stage memcheck "$LIMIT_memcheck" compute-sanitizer --tool memcheck --target-processes all \
            --error-exitcode 3 --log-file "$W/memcheck_%p.txt" "$PY" -m pytest -q -x -p no:cacheprovider $CUDA_TESTS
        # shellcheck disable=SC2086
        run_stage racecheck "$LIMIT_racecheck" compute-sanitizer --tool racecheck --racecheck-report hazard \
            --target-processes all --error-exitcode 3 --log-file "$W/racecheck_%p.txt" \
            "$PY" -m pytest -q -x -p no:cacheprovider tests/test_attention_cuda.py tests/test_cuda_head.py -k "$RACE_K"
        for f in "$W"/memcheck_*.txt "$W"/racecheck_*.txt; do
            [ -f "$f" ] && SUMMARY+=("  $(basename "$f"): $(grep -E 'SUMMARY' "$f" | tail -n 1)")
        done
    else
        SUMMARY+=("$(printf '%-22s %s' sanitizer "skipped: no compute-sanitizer or no GPU here")")
    fi
fi

if has_stage bench; then
    have_gpu || echo "[gpu_pass] torch sees no GPU: the benchmarks will run their CPU grids" >&2
    # shellcheck disable=SC2086
    run_stage bench_attention "$LIMIT_bench_attention" "$PY" benchmarks/attention.py $ATTN_ARGS \
        --out "$W/attention_gpu.json"
    # shellcheck disable=SC2086
    run_stage bench_denoiser "$LIMIT_bench_denoiser" "$PY" benchmarks/denoiser.py $DEN_ARGS --out "$W/denoiser_gpu.json"
    # shellcheck disable=SC2086
    run_stage bench_end_to_end "$LIMIT_bench_end_to_end" "$PY" benchmarks/end_to_end.py $E2E_ARGS \
        --out "$W/end_to_end_gpu.json"
    # shellcheck disable=SC2086
    run_stage bench_mar "$LIMIT_bench_mar" "$PY" benchmarks/mar_sampling.py $MAR_ARGS --out "$W/mar_sampling_gpu.json"
    # the tables each benchmark printed last, for the reply
    for b in attention denoiser end_to_end mar; do
        echo "---- $b" >>"$W/bench_tables.txt"
        tail -n 25 "$W/bench_$b.log" >>"$W/bench_tables.txt"
    done
    cp "$W"/*.png "$OUT"/ 2>/dev/null || true
fi

printf '%s\n' "${SUMMARY[@]}" >"$W/summary.txt"
tar -czf "$OUT/gpu_pass.tar.gz" -C "$(dirname "$W")" gpu_pass
cp "$W/summary.txt" "$OUT/gpu_pass_summary.txt"
[ -f "$W/bench_tables.txt" ] && cat "$W/bench_tables.txt"
# failures, for the reply (the tail of the output is what comes back)
[ -f "$W/tests.log" ] && grep -E "^(FAILED|ERROR) " "$W/tests.log" | head -n 40
[ -f "$W/env.log" ] && grep -E "^(torch|triton|Cuda|Build|NVIDIA-SMI)|H100|H200" "$W/env.log" | head -n 8
echo "==== gpu_pass summary ($OUT/gpu_pass.tar.gz)"
cat "$W/summary.txt"
