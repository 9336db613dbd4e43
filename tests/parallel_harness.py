"""Run training jobs on several CPU processes (gloo) and collect what rank 0 sees.

A job is (name, model kind, config overrides[, run_job options]): train at the config's layout,
then compute one more step's gradients and gather them into full-model tensors (not under
DeepSpeed, whose ZeRO keeps them partitioned). Rank 0 saves {"losses", "val_losses", "grad_norms",
"grads", "pool_replica_gap", "skipped_steps"} to <out>/<name>.pt. The same function run without processes
(`run_job(..., parallel=None)`) is the single-process reference.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_unipool.config import load_config
from megatron_unipool.training import Trainer, init_parallel
from megatron_unipool.training.distributed import gather_full_tensors

# small enough for 8 processes on 2 cores; heads, layers, vocabulary and pool divide by 2 and 4
BASE = ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=128",
        "model.seq_len=32", "train.global_batch=8", "train.micro_batch=2", "train.warmup_steps=1",
        "train.eval_batches=1", "train.eval_interval=0", "logging.tensorboard=false", "checkpoint.save_interval=0",
        "checkpoint.resume=false", "train.lr=0.003"]


def job_config(kind: str, overrides, data_cache: str, world_size: int):
    return load_config(f"configs/tiny_{kind}_cpu.json", BASE + [f"data.cache_dir={data_cache}"] + list(overrides),
                       world_size=world_size)


def pool_replica_gap(trainer) -> float:
    """Largest difference between a pool shard and its replicas (other stages, other dp ranks), over all ranks."""
    gap = torch.zeros(())
    for name, param in trainer.model.named_parameters():
        spec = trainer.specs.get(name)
        group = trainer.parallel.pool_group(spec.pool_stages) if spec and spec.pool_stages else None
        if group is not None:
            first = param.detach().clone()
            dist.broadcast(first, dist.get_global_rank(group, 0), group=group)
            gap = torch.maximum(gap, (param.detach() - first).abs().max())
    if trainer.parallel.distributed:
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return gap.item()


def poison_forward(trainer, step: int) -> None:
    """Make the last rank's forward output NaN during training step `step` (1-based): one rank's
    non-finite loss, which every rank must then skip alike."""
    if trainer.layout.rank != trainer.layout.world_size - 1:
        return
    trainer.model.final_norm.register_forward_hook(
        lambda module, inputs, output: output * float("nan") if trainer.state.step + 1 == step and module.training else None)


# logged per step, and summed over (or divided by) the ranks: what a layout must not change
LOGGED = ("dropped_fraction", "unrouted_fraction", "tokens_per_second", "tflops_per_device", "aux_loss", "z_loss",
          "entropy_loss")


def run_job(config, run_dir: Path, parallel=None, nan_at_step: int | None = None) -> dict | None:
    trainer = Trainer(config, run_dir, device=torch.device("cpu"), parallel=parallel)
    if nan_at_step is not None:
        poison_forward(trainer, nan_at_step)
    grad_norms, step_metrics, train_step = [], [], trainer.train_step

    def recording_step():  # the global gradient norm each step, as the backend computed it for clipping
        metrics, routing = train_step()
        grad_norms.append(metrics["grad_norm"])
        step_metrics.append(metrics)  # the dict the loop then completes with the step's rates and logs
        return metrics, routing

    trainer.train_step = recording_step
    summary = trainer.train()
    del trainer.train_step  # the wrapper holds the trainer: without this cycle it is freed when the job ends
    replica_gap = pool_replica_gap(trainer)
    grads = {}
    if not config.deepspeed.enabled:  # ZeRO keeps reduced gradients in its own partitions
        trainer.compute_gradients()
        grads = gather_full_tensors({n: p.grad for n, p in trainer.model.named_parameters()}, trainer.specs,
                                    trainer.parallel)
    if trainer.layout.rank != 0:
        return None
    return {"losses": summary["train_losses"], "val_losses": summary["val_losses"], "grad_norms": grad_norms, "grads": grads,
            "pool_replica_gap": replica_gap, "skipped_steps": trainer.state.skipped_steps,
            "metrics": [{key: m.get(key) for key in LOGGED} for m in step_metrics], "world_size": trainer.layout.world_size}


@contextlib.contextmanager
def process_group(rank: int, world_size: int, init_file: str):
    """This process as rank `rank` of a gloo group, torn down cleanly on exit."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))  # as a launcher would
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    try:
        yield
    finally:
        # free what still holds gloo work or groups (reference cycles) while the interpreter is whole: gloo
        # objects destroyed during interpreter shutdown abort the process ("terminate called without an
        # active exception")
        gc.collect()
        dist.destroy_process_group()


def _job_worker(rank: int, world_size: int, init_file: str, jobs: list, data_cache: str, out_dir: str):
    with process_group(rank, world_size, init_file):
        for name, kind, overrides, *options in jobs:
            config = job_config(kind, overrides, data_cache, world_size)
            result = run_job(config, Path(out_dir) / name, init_parallel(config), **(options[0] if options else {}))
            if rank == 0:
                torch.save(result, Path(out_dir) / f"{name}.pt")
            dist.barrier()


def _function_worker(rank: int, world_size: int, init_file: str, function: Callable, out_dir: str):
    with process_group(rank, world_size, init_file):
        torch.save(function(rank, world_size), Path(out_dir) / f"rank{rank}.pt")


def _spawn(worker: Callable, world_size: int, out_dir: Path, *args) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    init_file = out_dir / f"init_{os.getpid()}_{len(list(out_dir.iterdir()))}"
    mp.start_processes(worker, args=(world_size, str(init_file), *args, str(out_dir)), nprocs=world_size, join=True,
                       start_method="spawn")


def run_parallel(world_size: int, jobs: list, data_cache: str, out_dir: Path) -> dict[str, dict]:
    """Run every job on `world_size` processes, one after another; {name: rank 0's result}."""
    _spawn(_job_worker, world_size, out_dir, jobs, data_cache)
    return {job[0]: torch.load(out_dir / f"{job[0]}.pt", weights_only=False) for job in jobs}


def run_on_ranks(world_size: int, function: Callable, out_dir: Path) -> list:
    """`function(rank, world_size)` on `world_size` gloo processes (a module-level function, for
    spawn); what each rank returned, in rank order."""
    _spawn(_function_worker, world_size, out_dir, function)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
