"""Training throughput of whole models: tokens/s, TFLOP/s, MFU and peak memory per optimizer step.

    python benchmarks/end_to_end.py                       # tiny CPU configs: dense, vanilla, UniPool, reduced pool
    python benchmarks/end_to_end.py --suite gpu-182m      # one GPU, bf16: the 182M configs
    python benchmarks/end_to_end.py --suite gpu-469m --set train.micro_batch=4 --json out.json
    python benchmarks/end_to_end.py --suite gpu-182m --models vanilla --profile-steps 1   # where the time goes

Each model runs in a fresh process (clean peak memory, no allocator reuse across models) through
the real Trainer and data pipeline: `--warmup` steps, then `--steps` timed optimizer steps.
FLOPs per token are the PaLM convention of model/accounting.py (6 x active matmul parameters +
attention scores); MFU divides by the device's dense bf16 peak (GPU, bf16 runs only). Peak memory is
torch.cuda.max_memory_allocated on a GPU and the process's peak RSS on CPU.
`host ops` counts the aten operators one more step dispatches (step_profile.count_host_operators:
forward, backward, optimizer; on a GPU each launches a kernel or more, views aside): where the device
waits on the host, the step's time follows it, and it is exact on any machine, so a CPU run with the GPU
suites' models at narrow widths measures what a change does to it (docs/performance.md; RMSNorm, one
kernel each way on CUDA, decomposes on CPU). Not counted for
model.compile, whose graphs run eager while the counting mode is active.
The table's last column compares each MoE model's step time with the vanilla MoE model's.
A model whose run fails gets a row with `error` (its traceback is in the output) and the others
still run; the JSON is rewritten after each model, so a run stopped early keeps what it measured.
The exit status is 1 when any model failed. The `-compiled` models (model.compile) compile in their first
warm-up step. `--profile-steps N` then profiles N more steps of each
model (step_profile.py: device time by kernel category, the busiest kernels, launches per step, how
busy the device was) into its row's `profile` and the output, and prints where the device time of
vanilla MoE goes beyond dense's, and each other MoE model's beyond vanilla's. `--set deepspeed.enabled=true --set deepspeed.zero_stage=1`
measures through DeepSpeed's engine (bf16: its BF16_Optimizer, bf16 weights with fp32 masters)
instead of the built-in AdamW over fp32 weights under autocast.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_unipool  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from megatron_unipool.config import load_config  # noqa: E402
from megatron_unipool.parallel import init_distributed_from_env  # noqa: E402
from megatron_unipool.training import Trainer  # noqa: E402
from megatron_unipool.training.hardware import device_name, peak_flops  # noqa: E402
from measurement import (QUIET, checked_overrides, error_text, json_output, non_negative_int,  # noqa: E402
                         positive_int)
from step_profile import (count_host_operators, difference, format_difference, format_profile,  # noqa: E402
                          profile_steps)

# 128 sequences per step in several micro-batches: the optimizer step is amortised as in training (the 182M/469M
# configs' global batch of 512 is 16-64 micro-batches on one GPU), which 1 micro-batch per step would overstate 2-4x
# for the MoE models. Micro-batches as large as an 80 GB H100 holds: at 8 sequences the step was host-bound (device
# idle for a quarter to a third of it), at 32 (182M; 16 for 469M) the device is busy 83-93% (docs/benchmarks.md)
ONE_GPU_182M = ["parallel.ep=1", "train.micro_batch=32", "train.global_batch=128"]
ONE_GPU_469M = ["parallel.ep=1", "train.micro_batch=16", "train.global_batch=128"]
PER_LAYER = "model.pool_weight_gradients=per_layer"  # the pool's casts and weight gradients layer by layer
# the Triton kernels: RoPE, silu(gate) * up, the MoE permute and combine, and a shared pool's deferred weight
# gradients (UniPool)
FUSED = ["model.rope_kernel=triton", "model.swiglu_kernel=triton", "model.permute_kernel=triton",
         "model.pool_wgrad_kernel=triton"]
ZERO1 = ["deepspeed.enabled=true", "deepspeed.zero_stage=1"]  # DeepSpeed's engine: bf16 weights, fp32 masters
ROWS_GEMM = FUSED + ["model.expert_gemm=triton"]  # and every expert GEMM in Triton (few rows per expert)
# twice the 469M suite's micro-batch, its memory made room for by recomputing the expert computation in backward:
# twice the rows per expert (UniPool's pool of 192 reads its weights as often either way) for a third more expert FLOPs
RECOMPUTE_MB32 = ["parallel.ep=1", "train.micro_batch=32", "train.global_batch=128", "model.activation_checkpointing=ffn"]
COMPILED = ["model.compile=true"]  # torch.compile graphs: attention sublayers, norms, MoE routers, dense FFNs
DOCUMENTS = ["model.document_masking=true"]  # attention within documents: SDPA with a mask (no flash kernel)
# name -> (config, overrides); the reduced pools hold 2/3 and 1/2 of the full pool's experts
SUITES = {
    "cpu": {
        "dense": ("configs/tiny_dense_cpu.json", []),
        "vanilla": ("configs/tiny_vanilla_cpu.json", []),
        "unipool": ("configs/tiny_unipool_cpu.json", []),
        "unipool-pool50%": ("configs/tiny_unipool_cpu.json", ["moe.pool_size=16"]),
        "unipool-per-layer-wgrad": ("configs/tiny_unipool_cpu.json", [PER_LAYER]),
        "dense-compiled": ("configs/tiny_dense_cpu.json", COMPILED),
        "unipool-compiled": ("configs/tiny_unipool_cpu.json", COMPILED),
        "unipool-documents": ("configs/tiny_unipool_cpu.json", DOCUMENTS),
    },
    "gpu-182m": {
        "dense": ("configs/dense_182m.json", ONE_GPU_182M),
        "vanilla": ("configs/vanilla_182m.json", ONE_GPU_182M),
        "unipool": ("configs/unipool_182m.json", ONE_GPU_182M),
        # vanilla routed by UniPool's NormRouter (with vanilla's per-layer aux loss): against vanilla the router's
        # cost, against UniPool the pool's and its pool-level aux loss's
        "vanilla-norm": ("configs/vanilla_182m.json", ONE_GPU_182M + ["moe.router=norm"]),
        "unipool-pool64": ("configs/unipool_182m_pool64.json", ONE_GPU_182M),
        "unipool-pool48": ("configs/unipool_182m_pool48.json", ONE_GPU_182M),
        "unipool-per-layer-wgrad": ("configs/unipool_182m.json", ONE_GPU_182M + [PER_LAYER]),
        "vanilla-fused": ("configs/vanilla_182m.json", ONE_GPU_182M + FUSED),
        "unipool-fused": ("configs/unipool_182m.json", ONE_GPU_182M + FUSED),
        "dense-fused": ("configs/dense_182m.json", ONE_GPU_182M + FUSED),
        "vanilla-zero1": ("configs/vanilla_182m.json", ONE_GPU_182M + ZERO1),
        "unipool-zero1": ("configs/unipool_182m.json", ONE_GPU_182M + ZERO1),
        "unipool-router-tf32": ("configs/unipool_182m.json", ONE_GPU_182M + ["moe.router_tf32=true"]),
        "unipool-triton-gemm": ("configs/unipool_182m.json", ONE_GPU_182M + ROWS_GEMM),
        "dense-compiled": ("configs/dense_182m.json", ONE_GPU_182M + COMPILED),
        "vanilla-compiled": ("configs/vanilla_182m.json", ONE_GPU_182M + COMPILED),
        "unipool-compiled": ("configs/unipool_182m.json", ONE_GPU_182M + COMPILED),
        "unipool-documents": ("configs/unipool_182m.json", ONE_GPU_182M + DOCUMENTS),
    },
    "gpu-469m": {
        "dense": ("configs/dense_469m.json", ONE_GPU_469M),
        "vanilla": ("configs/vanilla_469m.json", ONE_GPU_469M),
        "unipool": ("configs/unipool_469m.json", ONE_GPU_469M),
        "unipool-pool96": ("configs/unipool_469m_pool96.json", ONE_GPU_469M),
        "unipool-fused": ("configs/unipool_469m.json", ONE_GPU_469M + FUSED),
        "unipool-triton-gemm": ("configs/unipool_469m.json", ONE_GPU_469M + ROWS_GEMM),
        "dense-compiled": ("configs/dense_469m.json", ONE_GPU_469M + COMPILED),
        "vanilla-compiled": ("configs/vanilla_469m.json", ONE_GPU_469M + COMPILED),
        "unipool-compiled": ("configs/unipool_469m.json", ONE_GPU_469M + COMPILED),
        "vanilla-mb32-recompute": ("configs/vanilla_469m.json", RECOMPUTE_MB32),
        "unipool-mb32-recompute": ("configs/unipool_469m.json", RECOMPUTE_MB32),
    },
}


def after_timing(what: str, run):
    """(run(), None), or (None, its error) when it fails: a profiler that fails (its CUDA timeline), or an operator
    count, keeps the row's timing, with the error beside it."""
    try:
        return run(), None
    except Exception as error:
        text = error_text(error)
        print(f"{what} failed, the row keeps its timing: {text}", file=sys.stderr, flush=True)
        return None, text


def measure(config_path: str, overrides: list[str], warmup: int, steps: int, profiled: int = 0) -> dict:
    """Time `steps` optimizer steps after `warmup` in this process, count the operators of one more, then
    profile `profiled` more; one JSON-able row."""
    config = load_config(REPO / config_path, QUIET + overrides + [f"train.max_steps={warmup + steps + 1 + profiled}"])
    if config.model.compile and warmup < 1:
        raise ValueError("model.compile: the first step compiles the blocks, so --warmup must be at least 1")
    if config.deepspeed.enabled:  # its engine needs a process group, of one process here
        init_distributed_from_env(config.parallel.timeout_s, even_alone=True)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir)
        for _ in range(warmup):
            trainer.train_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(steps):
            metrics, _ = trainer.train_step()  # .item() on the loss waits for the device
        seconds = (time.perf_counter() - started) / steps
        # after the timing, as both slow their steps. No count under model.compile, whose graphs run eager while
        # an operator-counting mode is active (the count would be of the eager code)
        operators, count_error = (None, None) if config.model.compile else after_timing(
            "counting operators", lambda: count_host_operators(trainer.train_step))
        profile, profile_error = after_timing(
            "profiling", lambda: profile_steps(trainer.train_step, profiled)) if profiled else (None, None)
    tokens_per_step = config.train.global_batch * config.model.seq_len
    flops_per_token = trainer.budget.train_flops_per_token
    tokens_per_second = tokens_per_step / seconds
    peak = peak_flops(config.train.precision)
    if torch.cuda.is_available():
        memory, memory_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    else:
        memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    return {
        "config": config_path, "overrides": overrides, "kind": config.moe.kind, "precision": config.train.precision,
        "backend": f"deepspeed zero-{config.deepspeed.zero_stage}" if config.deepspeed.enabled else "built-in",
        "total_params": trainer.budget.total_params, "active_params": trainer.budget.active_params,
        "tokens_per_step": tokens_per_step, "step_ms": 1e3 * seconds, "tokens_per_second": tokens_per_second,
        "tflops": tokens_per_second * flops_per_token / 1e12,
        "mfu_percent": 100.0 * tokens_per_second * flops_per_token / peak if peak else None,
        "peak_memory_mib": memory, "memory_kind": memory_kind, "last_loss": metrics["lm_loss"],
        "host_operators_per_step": sum(operators.values()) if operators else None,
        "host_operators": dict(operators.most_common()) if operators else None,
        "device": device_name(), "date": time.strftime("%Y-%m-%d"),
    } | ({"profile": profile} if profile else {}) | ({"profile_error": profile_error} if profile_error else {}) | (
        {"host_operators_error": count_error} if count_error else {})


def table(rows: list[dict]) -> str:
    measured = [r for r in rows if "error" not in r]
    vanilla = next((r for r in measured if r["name"] == "vanilla"), None)
    width = max(len("model"), *(len(r["name"]) for r in rows))
    where = f"{measured[0]['device']} ({measured[0]['precision']})" if measured else "- (no model measured)"
    lines = [f"end-to-end training steps on {where}",
             f"{'model':<{width}} {'params':>8} {'active':>8} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU %':>6}"
             f" {'peak MiB':>9} {'host ops':>9} {'vs vanilla':>10}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<{width}} failed: {r['error']}")
            continue
        mfu = f"{r['mfu_percent']:.1f}" if r["mfu_percent"] is not None else "-"
        ratio = f"{r['step_ms'] / vanilla['step_ms']:.3f}" if vanilla and r["kind"] != "dense" else "-"
        host_operators = f"{r['host_operators_per_step']:,}" if r.get("host_operators_per_step") else "-"
        lines.append(f"{r['name']:<{width}} {r['total_params'] / 1e6:>7.2f}M {r['active_params'] / 1e6:>7.2f}M "
                     f"{r['step_ms']:>9.1f} {r['tokens_per_second']:>10,.0f} {r['tflops']:>8.3f} {mfu:>6}"
                     f" {r['peak_memory_mib']:>9,.0f} {host_operators:>9} {ratio:>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=list(SUITES), default="cpu")
    parser.add_argument("--models", nargs="+", help="a subset of the suite's models")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override applied to every model; repeatable")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--profile-steps", type=non_negative_int, default=0, help="profile this many more steps per model")
    parser.add_argument("--json", type=json_output, help="write the rows here")
    parser.add_argument("--one", nargs=2, metavar=("NAME", "ROW_FILE"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    if args.one:
        name, row_file = args.one
        config_path, overrides = suite[name]
        row = measure(config_path, overrides + args.overrides, args.warmup, args.steps, args.profile_steps)
        if "profile" in row:
            print(format_profile(name, row["profile"]), file=sys.stderr, flush=True)
        Path(row_file).write_text(json.dumps(dict(row, name=name)))
        if torch.distributed.is_initialized():  # not left to exit: NCCL warns about it, gloo can abort
            torch.distributed.destroy_process_group()
        return 0
    names = args.models or list(suite)
    unknown = [name for name in names if name not in suite]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not in suite {args.suite!r} ({', '.join(suite)})")
    checked_overrides(parser, [(REPO / suite[name][0], QUIET + suite[name][1] + args.overrides) for name in names])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row_file = Path(tmp) / f"{name}.json"
            command = [sys.executable, __file__, "--suite", args.suite, "--one", name, str(row_file),
                       "--warmup", str(args.warmup), "--steps", str(args.steps), "--profile-steps", str(args.profile_steps)]
            command += [item for override in args.overrides for item in ("--set", override)]
            print(f"  measuring {name} ...", file=sys.stderr, flush=True)
            status = subprocess.run(command).returncode  # here: relative paths in --set mean the caller's directory
            if status == 0:
                row = json.loads(row_file.read_text())
                print(f"  {name}: {row['step_ms']:.1f} ms per step, {row['tokens_per_second']:,.0f} tokens/s",
                      file=sys.stderr, flush=True)
            else:
                row = {"name": name, "config": suite[name][0], "error": f"exit status {status} (output above)"}
                print(f"  {name} failed: {row['error']}", file=sys.stderr, flush=True)
            rows.append(row)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    print(table(rows))
    profiled = {row["name"]: row for row in rows if "profile" in row}
    # where the MoE layers' time goes (vanilla against dense), and each other MoE model's extra time (against vanilla)
    pairs = [("vanilla", "dense")] + [(row["name"], "vanilla") for row in profiled.values()
                                      if row["kind"] != "dense" and row["name"] != "vanilla"]
    for name, reference in pairs:
        if name in profiled and reference in profiled:
            print(format_difference(name, reference, difference(profiled[name]["profile"], profiled[reference]["profile"])))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
