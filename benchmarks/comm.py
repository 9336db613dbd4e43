"""Expert-parallel all-to-all traffic per optimizer step: vanilla MoE vs UniPool at the same ep.

    python benchmarks/comm.py [--ep 2] [--steps 3] [--json out.json]        # spawns --ep CPU processes (gloo)
    torchrun --nproc_per_node 8 benchmarks/comm.py --ep 8 --suite gpu-182m   # on GPUs, under a launcher

Every `torch.distributed.all_to_all_single` of the training step is counted on every rank:
bytes each rank sends to other ranks (what crosses the network), bytes it keeps (its own split),
and the routing-count exchanges that precede each token exchange. Both models route the same
number of token slots per layer (tokens x k) with dropless routing, so their traffic should
match up to how evenly the routers spread tokens over the ep ranks; UniPool's pool is sharded
identically in every layer, so sharing adds no communication.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_unipool  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from megatron_unipool.config import load_config  # noqa: E402
from megatron_unipool.parallel import init_distributed_from_env  # noqa: E402
from megatron_unipool.training import Trainer, init_parallel  # noqa: E402
from megatron_unipool.training.hardware import device_name  # noqa: E402
from measurement import QUIET, checked_overrides, json_output, positive_int  # noqa: E402

SUITES = {
    "cpu": {"vanilla": "configs/tiny_vanilla_cpu.json", "unipool": "configs/tiny_unipool_cpu.json"},
    "gpu-182m": {"vanilla": "configs/vanilla_182m.json", "unipool": "configs/unipool_182m.json"},
}


class AllToAllCounter:
    """Wraps dist.all_to_all_single for the duration of a `with`, tallying bytes by kind."""

    def __init__(self):
        self.bytes = Counter()
        self.calls = Counter()

    def __enter__(self):
        self.original = dist.all_to_all_single

        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            kind = "tokens" if input.is_floating_point() else "counts"
            me = dist.get_rank(group)
            row = input[0].numel() * input.element_size() if input.shape[0] else 0
            splits = input_split_sizes or [input.shape[0] // dist.get_world_size(group)] * dist.get_world_size(group)
            self.bytes[f"{kind}_remote"] += row * (sum(splits) - splits[me])
            self.bytes[f"{kind}_local"] += row * splits[me]
            self.calls[kind] += 1
            return self.original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.original


def measure(name: str, config_path: str, ep: int, steps: int, overrides: list[str]) -> dict:
    world = dist.get_world_size()
    config = load_config(REPO / config_path, QUIET + [f"parallel.ep={ep}", f"train.max_steps={steps + 1}"] + overrides,
                         world_size=world)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, parallel=init_parallel(config))
        trainer.train_step()  # warm-up, not counted
        routed = 0
        with AllToAllCounter() as counter:
            for _ in range(steps):
                _, routing = trainer.train_step()
                routed += sum(int(c.sum()) for c in routing.counts_per_pool)
    totals = torch.tensor([counter.bytes[k] for k in ("tokens_remote", "tokens_local", "counts_remote")] +
                          [counter.calls["tokens"]], dtype=torch.float64, device=trainer.device)
    dist.all_reduce(totals)  # over all ranks: the job's traffic (on the training device: NCCL takes no CPU tensor)
    remote, local, counts, calls = totals.tolist()
    return {
        "name": name, "config": config_path, "ep": ep, "world_size": world, "kind": config.moe.kind,
        "moe_layers": len(config.moe.moe_layers(config.model.num_layers)), "top_k": config.moe.top_k,
        "tokens_per_step": config.train.global_batch * config.model.seq_len,
        "routed_slots_per_step": routed / steps,
        "token_bytes_remote_per_step": remote / steps, "token_bytes_local_per_step": local / steps,
        "count_bytes_remote_per_step": counts / steps, "remote_fraction": remote / (remote + local) if remote + local else 0.0,
        "all_to_all_calls_per_step": calls / steps / world,
        "device": device_name(),
        "date": time.strftime("%Y-%m-%d"),
    }


def run(args) -> list[dict]:
    init_distributed_from_env(600)
    torch.set_num_threads(1)
    try:
        rows = [measure(name, path, args.ep, args.steps, args.overrides) for name, path in SUITES[args.suite].items()]
    finally:
        dist.destroy_process_group()
    return rows


def _spawned(rank: int, world: int, port: int, args, out: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    rows = run(args)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def table(rows: list[dict]) -> str:
    lines = [f"all-to-all per optimizer step at ep {rows[0]['ep']} (world {rows[0]['world_size']}, {rows[0]['device']})",
             f"{'model':<9} {'slots':>9} {'remote MiB':>11} {'local MiB':>10} {'remote %':>9} {'count KiB':>10}"
             f" {'calls':>6} {'vs vanilla':>10}"]
    vanilla = next(r for r in rows if r["kind"] == "vanilla")
    for r in rows:
        lines.append(f"{r['name']:<9} {r['routed_slots_per_step']:>9,.0f} {r['token_bytes_remote_per_step'] / 2**20:>11.2f}"
                     f" {r['token_bytes_local_per_step'] / 2**20:>10.2f} {100 * r['remote_fraction']:>9.1f}"
                     f" {r['count_bytes_remote_per_step'] / 2**10:>10.2f} {r['all_to_all_calls_per_step']:>6.0f}"
                     f" {r['token_bytes_remote_per_step'] / vanilla['token_bytes_remote_per_step']:>10.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--suite", choices=list(SUITES), default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", type=json_output)
    args = parser.parse_args(argv)
    if args.ep < 2:  # one expert-parallel rank sends nothing: no traffic to count (nor a process group to count it on)
        parser.error(f"--ep must be at least 2, not {args.ep}")
    world = int(os.environ.get("WORLD_SIZE", args.ep))
    # both models or neither: the table compares them, and a model failing in the spawned ranks is a traceback each
    for path in SUITES[args.suite].values():
        checked_overrides(parser, [(REPO / path, QUIET + [f"parallel.ep={args.ep}"] + args.overrides)], world_size=world)
    if "WORLD_SIZE" in os.environ:  # under torchrun / deepspeed: this process is one rank
        rows = run(args)
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            mp.start_processes(_spawned, args=(args.ep, port, args, str(out)), nprocs=args.ep, join=True,
                               start_method="spawn")
            rows = json.loads(out.read_text())
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
