#!/usr/bin/env bash
# What one H200 call runs for the engine, the server and the decode kernels (through the device tool), in order:
# the GPU tests, the kernel micro-benchmarks, engine throughput, the server load test, batch-1 decode.
# Each part has its own time limit so that one failure cannot eat the others' time. Results land in $OUT.
#   bash benchmarks/h200_engine.sh [tests] [tests-gemv] [tests-decode] [tests-fused] [tests-engine] [engine-loop] [engine-loop-compiled] [decode-splits] [gemv-sweep] [mm-sweep] [layers-autotune] [layers-fused] [persistent] [kernels] [throughput] [compiled] [compiled-engine] [gemv] [engine-gemv]
#                                  [serve] [serve-compiled] [serve-multi] [serve-spy] [serve-spy-compiled] [serve-auto] [decode] [decode-compiled] [decode-gemv] [startup] [startup-compiled] [startup-spy] [prefill-compiled] [sampler] [prefill] [profile] [profile-compiled] [profile-int8] [profile-gemv]
#   (default: tests kernels throughput serve decode startup profile)
# Carry [".whl", ".compile_cache.tgz"] (the latter joined from an earlier call's parts: benchmarks/compile_cache.py).
# Packages the device image lacks (fastapi, uvicorn, uvloop, pydantic, prompt_toolkit) travel as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
# What torch.compile and Triton build (inductor's FX graphs and kernels, Triton binaries) goes to .compile_cache/,
# which comes back gzipped in parts ($OUT/compile_cache.tgz.000, ...; benchmarks/compile_cache.py). Joined here into
# .compile_cache.tgz and carried to the next call (carry: [".whl", ".compile_cache.tgz"]), it saves that call's
# compiling.
if [[ -f .compile_cache.tgz ]]; then python3 benchmarks/compile_cache.py unpack .compile_cache.tgz .; fi
export TORCHINDUCTOR_CACHE_DIR=$PWD/.compile_cache/inductor TRITON_CACHE_DIR=$PWD/.compile_cache/triton
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false THROUGHPUT_FLAGS=${THROUGHPUT_FLAGS:-} TAG=${TAG:-}
OUT=${OUT:-out/h200}
mkdir -p "$OUT"
parts=${*:-tests kernels throughput serve decode startup profile}
log="$OUT/h200.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
python3 -c "import torch, transformers, triton, importlib.util as u; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'uvloop', u.find_spec('uvloop') is not None)" | tee -a "$log"

run() {  # run <seconds> <name> <command...>: one part, its output in the log and in $OUT/<name>.log
  local limit=$1 name=$2; shift 2
  local start; start=$(date +%s)
  echo "=== $name" | tee -a "$log"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "Warning\|^W1\|warnings.warn" "$OUT/$name.log" | tail -40 | tee -a "$log"
  echo "=== $name: rc=$rc, $(( $(date +%s) - start )) s" | tee -a "$log"
}

if [[ " $parts " == *" tests "* ]]; then
  run 330 tests python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_engine.py \
    tests/test_engine_compile.py tests/test_kernels.py tests/test_gemv_linear.py tests/test_triton_sampling.py \
    -k "cuda or gpu or triton or graph or kernel or compile or fp8 or gemv" -rs
fi
if [[ " $parts " == *" tests-gemv "* ]]; then  # the GEMV kernels and modules on CUDA (the split-K fix-up's ordering)
  run 150 tests-gemv python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gemv_linear.py -rs
fi
if [[ " $parts " == *" tests-decode "* ]]; then  # the paged kernels and the engine's graphs on CUDA (no compile)
  run 200 tests-decode python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_engine.py \
    -k "cuda or gpu or triton or graph or kernel" -rs
fi
if [[ " $parts " == *" tests-fused "* ]]; then  # the paged kernels (QK-norm + RoPE + store fused), eager and compiled engine
  run 300 tests-fused python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_engine.py \
    tests/test_engine_compile.py -k "cuda or gpu or triton or graph or kernel" -rs
fi
if [[ " $parts " == *" tests-engine "* ]]; then  # the engine's CUDA graph and kernel tests (a few minutes less than tests)
  run 200 tests-engine python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_engine_stream.py \
    tests/test_triton_sampling.py -k "cuda or gpu or triton or graph or kernel" -rs
fi
if [[ " $parts " == *" engine-loop-compiled "* ]]; then  # only the compiled run of the part below
  PATH=/tmp/site/bin:$PATH run 330 engine-loop-compiled python3 benchmarks/engine_loop.py --compile \
    --py-spy "$OUT/engine_loop_spy.txt"
fi
if [[ " $parts " == *" engine-loop "* ]]; then  # the streaming loop against LLM.generate, eager then compiled + py-spy
  run 150 engine-loop python3 benchmarks/engine_loop.py
  PATH=/tmp/site/bin:$PATH run 330 engine-loop-compiled python3 benchmarks/engine_loop.py --compile \
    --py-spy "$OUT/engine_loop_spy.txt"
fi
if [[ " $parts " == *" decode-splits "* ]]; then  # the decode kernel's split count by batch size, per launch config
  run 200 decode-splits python3 benchmarks/kernels.py --decode-splits --budget ${SPLITS_BUDGET:-170}
fi
if [[ " $parts " == *" gemv-sweep "* ]]; then  # the Triton GEMV's launch shapes on the fused projections
  run 150 gemv-sweep python3 benchmarks/decode.py --gemv --gemv-sweep
fi
if [[ " $parts " == *" mm-sweep "* ]]; then  # the split-K small-M matmul against cuBLAS at decode batch sizes
  run 420 mm-sweep python3 benchmarks/decode.py --gemv --gemv-rows 256,128,64,32 --gemv-sweep --gemv-weights bf16 \
    --gemv-budget 330
fi
if [[ " $parts " == *" layers-autotune "* ]]; then  # the decode layers' GEMMs and fused kernels: inductor's tuning
  TORCHINDUCTOR_DEFAULT_AUTOTUNE_WARMUP=5 TORCHINDUCTOR_DEFAULT_AUTOTUNE_REP=20 \
    TORCHINDUCTOR_AUTOTUNE_NUM_CHOICES_DISPLAYED=4 run 420 layers-autotune python3 benchmarks/layers_autotune.py \
    --budget ${AUTOTUNE_BUDGET:-330} --batches 256,128,64,16 --variants default,autotune,autotune+cdt,cdt
fi
if [[ " $parts " == *" layers-fused "* ]]; then  # QK-norm + RoPE + store as one kernel; inductor's combo kernels
  run 300 layers-fused python3 benchmarks/layers_autotune.py --variants default,combo,cublaslt --forms plain,fused \
    --batches 256,64,16,2 --budget 240
fi
if [[ " $parts " == *" persistent "* ]]; then  # the persistent batch-1 decode step: correct with 132 programs? how fast?
  run 200 persistent python3 benchmarks/persistent_decode.py --launches default,no-wait,late-loads,ahead2,poll-load \
    --trace default,no-wait
  run 120 persistent-long python3 benchmarks/persistent_decode.py --prompt 2048 --steps 64 \
    --launches default,splits32 --trace default
  run 120 tests-persistent python3 -m pytest -q -p no:cacheprovider tests/test_persistent_decode.py -rs
fi
if [[ " $parts " == *" kernels "* ]]; then
  run 130 kernels python3 benchmarks/kernels.py
fi
if [[ " $parts " == *" throughput "* ]]; then
  run 280 "throughput$TAG" python3 benchmarks/throughput.py $THROUGHPUT_FLAGS --results "$OUT/results.md"
fi
if [[ " $parts " == *" compiled "* ]]; then
  run 560 "compiled$TAG" python3 benchmarks/throughput.py --compile --trace --skip-transformers --skip-padded \
    $THROUGHPUT_FLAGS --results "$OUT/results.md"
fi
if [[ " $parts " == *" compiled-engine "* ]]; then  # compile=True against eager: a prefill step, batch 1 and 8
  run 400 compiled-engine python3 benchmarks/compiled_engine.py
fi
if [[ " $parts " == *" gemv "* ]]; then
  run 120 gemv python3 benchmarks/decode.py --gemv
fi
if [[ " $parts " == *" engine-gemv "* ]]; then
  run 200 engine-gemv python3 benchmarks/decode.py --engine-gemv --results "$OUT/results.md"
fi
if [[ " $parts " == *" serve "* ]]; then
  run 240 serve python3 benchmarks/serve.py --max-seconds 40
fi
if [[ " $parts " == *" serve-compiled "* ]]; then  # the server and the baseline with LLM(compile=True)
  run 560 serve-compiled python3 benchmarks/serve.py --max-seconds 40 --compile
fi
if [[ " $parts " == *" serve-multi "* ]]; then  # compiled, 4 HTTP processes over the engine process, 8 client processes
  run 560 serve-multi python3 benchmarks/serve.py --max-seconds 40 --compile --api-server-count 4 --client-procs 8
fi
if [[ " $parts " == *" serve-spy "* ]]; then  # py-spy over the server, the engine process and the clients
  run 240 serve-spy /tmp/site/bin/py-spy record --subprocesses --nonblocking -r 50 -f raw -o "$OUT/serve_spy.txt" -- \
    python3 benchmarks/serve.py --max-seconds 30 --concurrency 64 256
fi
if [[ " $parts " == *" serve-spy-compiled "* ]]; then  # the same, compiled: where the engine process's 7.6 ms go
  run 560 serve-spy-compiled /tmp/site/bin/py-spy record --subprocesses --nonblocking -r 100 -f raw \
    -o "$OUT/serve_spy_compiled.txt" -- python3 benchmarks/serve.py --max-seconds 30 --compile --concurrency 256
fi
if [[ " $parts " == *" serve-auto "* ]]; then  # the stream interval that wakes streams less often above 64
  run 240 serve-auto python3 benchmarks/serve.py --max-seconds 40 --stream-interval auto
fi
if [[ " $parts " == *" decode "* ]]; then
  run 240 decode python3 benchmarks/decode.py --device cuda --skip-fast-path --results "$OUT/results.md"
fi
if [[ " $parts " == *" decode-compiled "* ]]; then  # batch 1 through LLM(compile=True) too (minutes of compiling)
  run 560 decode-compiled python3 benchmarks/decode.py --device cuda --skip-fast-path --skip-peer --engine-compile \
    --results "$OUT/results.md"
fi
if [[ " $parts " == *" decode-gemv "* ]]; then  # batch 1, bf16 and int8, through the default CUDA engine (compile + GEMV)
  run 560 decode-gemv python3 benchmarks/decode.py --device cuda --skip-fast-path --skip-peer --engine-compile \
    --skip-engine-cublas --results "$OUT/results.md"
fi
if [[ " $parts " == *" startup "* ]]; then
  run 150 startup python3 benchmarks/startup.py
fi
if [[ " $parts " == *" startup-compiled "* ]]; then  # qwen3 chat --compile from cold and from warm compile caches
  run 330 startup-compiled python3 benchmarks/startup.py --compile
fi
if [[ " $parts " == *" startup-spy "* ]]; then  # the above plus a warm chat --compile start under py-spy: where it goes
  PATH=/tmp/site/bin:$PATH run 450 startup-spy python3 benchmarks/startup.py --compile --py-spy "$OUT/startup_spy.txt"
  python3 benchmarks/spy_summary.py "$OUT/startup_spy.txt" --top 60 --processes 2 > "$OUT/startup_spy_summary.txt"
  rm -f "$OUT/startup_spy.txt"
fi
if [[ " $parts " == *" prefill-compiled "* ]]; then  # the compiled prompt steps: where 52 ms per 16,384 tokens go
  run 420 prefill-compiled python3 benchmarks/profile_engine.py --prefill --compile --seqs 32 --context 512
fi
if [[ " $parts " == *" sampler "* ]]; then
  run 120 sampler python3 benchmarks/sampler.py
fi
if [[ " $parts " == *" prefill "* ]]; then
  run 150 prefill python3 benchmarks/profile_engine.py --prefill --seqs 32 --context 512
fi
if [[ " $parts " == *" profile "* ]]; then
  run 150 profile python3 benchmarks/profile_engine.py
fi
if [[ " $parts " == *" profile-compiled "* ]]; then  # one compiled engine (Triton GEMV for <= 16 rows): kernel tables at 256, 64, 8 and 1
  run 420 profile-compiled python3 benchmarks/profile_engine.py --compile --gemv --then 64,8,1
fi
if [[ " $parts " == *" profile-int8 "* ]]; then  # int8 weights, compiled + GEMV: why batch 1 is slower than bf16
  run 240 profile-int8 python3 benchmarks/profile_engine.py --compile --gemv --int8 --seqs 8 --then 1
fi
if [[ " $parts " == *" profile-gemv "* ]]; then  # compiled small buckets with the Triton GEMV: batch 8 and 1
  run 300 profile-gemv python3 benchmarks/profile_engine.py --compile --gemv --seqs 8 --then 1
fi
if [[ -d .compile_cache ]]; then
  python3 benchmarks/compile_cache.py pack .compile_cache "$OUT" | tee -a "$log"
fi
