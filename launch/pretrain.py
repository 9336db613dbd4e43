"""Pretrain a dense, vanilla-MoE or UniPool model from a JSON config, on one process or many.

    python launch/pretrain.py [--config PATH] [--run-dir DIR] [--set section.key=value ...]
    torchrun --nproc_per_node 4 launch/pretrain.py --set parallel.tp=2 --set parallel.pp=2
    deepspeed --num_gpus 8 launch/pretrain.py --config configs/unipool_182m.json
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 launch/pretrain.py --config ...

SIGTERM (a scheduler's preemption) saves the step under way and exits 143; Ctrl-C interrupts at once
(exit 130; docs/reliability.md). Without --config it trains configs/tiny_unipool_cpu.json (1-3 minutes on 2 CPU cores); a run
directory's config.json (tools/upcycle.py and convert_checkpoint.py write OUT/config.json beside
OUT/checkpoints) continues that run without --run-dir. Relative paths in the config mean the
directory the command runs in (stored absolute in the run's checkpoints). The
launchers describe the job in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...); the
parallel degrees come from the config's `parallel` section, data parallelism takes the rest.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_unipool  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from megatron_unipool.config import ConfigError, load_config  # noqa: E402
from megatron_unipool.kernels import KernelUnavailableError  # noqa: E402
from megatron_unipool.parallel import LaunchError, init_distributed_from_env, job_position  # noqa: E402
from megatron_unipool.training import (CheckpointError, DataError, NonFiniteError, RunStopped, Trainer,  # noqa: E402
                                       checkpoint_to_resume, checkpoints_dir, init_parallel)
from megatron_unipool.training.checkpoint import remove_unused_run_directory  # noqa: E402

# reported as one line (a ConfigError here: a file the config names changed after loading; KernelUnavailableError:
# a kernel choice this machine cannot run); anything else is a bug: traceback
RUN_ERRORS = (CheckpointError, ConfigError, DataError, KernelUnavailableError, NonFiniteError)
# what gloo and NCCL say when a peer died (its sockets closed) or hangs (parallel.timeout_s ran out)
PEER_FAILURES = ("Timed out", "timed out", "Connection reset", "Connection closed", "Broken pipe", "NCCL error")


def peer_failure(error: BaseException) -> bool:
    return dist.is_initialized() and (isinstance(error, dist.DistError) or any(s in str(error) for s in PEER_FAILURES))


class Interruption:
    """Ctrl-C (SIGINT), or SIGTERM (a scheduler's preemption, which torchrun and deepspeed.launcher.launch
    pass on to every rank, and with which the latter follows Ctrl-C): a KeyboardInterrupt while
    the job works, once; a signal that comes later (a launcher sends both, or again) or while the run
    reports and cleans up is only noted, so that those run whole. While the job trains with
    checkpoint.save_on_sigterm, SIGTERM only sets `stop_requested`: the trainer saves at the end of
    the step and stops. The job exits with 128 + the first signal's number, as a shell reports a process
    that signal ended: 130 for Ctrl-C, 143 for SIGTERM."""

    def __init__(self):
        self.seen = False
        self.exit_status = 130
        self.raising = False  # until the first interruptible part, which a signal noted before then ends at once
        self.sigterm_stops_at_step_end = False
        self.sigterm_seen = False

    def __call__(self, signum, frame) -> None:
        if not self.seen:
            self.seen, self.exit_status = True, 128 + signum
        if signum == signal.SIGTERM and self.sigterm_stops_at_step_end:
            self.sigterm_seen = True
            return
        if self.raising:
            self.raising = False
            raise KeyboardInterrupt

    def stop_requested(self) -> bool:
        return self.sigterm_seen

    @contextlib.contextmanager
    def interruptible(self, sigterm_stops_at_step_end: bool = False):
        if self.seen:  # noted between two interruptible parts
            raise KeyboardInterrupt
        self.raising, self.sigterm_stops_at_step_end = True, sigterm_stops_at_step_end
        try:
            yield
        finally:
            self.raising, self.sigterm_stops_at_step_end = False, False


# a rank whose peer the launcher's Ctrl-C stopped gets its own signal moments later (it reaches every rank)
PEER_SIGNAL_GRACE_S = 1.0

DEFAULT_CONFIG = REPO / "configs" / "tiny_unipool_cpu.json"


def default_run_dir(config_file: Path) -> Path:
    """A run directory's own config.json (tools/upcycle.py and convert_checkpoint.py write it next to
    checkpoints/) continues that run; runs/config would start a fresh model, shared by every such run."""
    if config_file.name == "config.json" and checkpoints_dir(config_file.parent).is_dir():
        return config_file.parent
    return Path("runs") / config_file.stem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="JSON config (default: %(default)s)")
    parser.add_argument("--run-dir", default=None,
                        help="checkpoints, TensorBoard events, summary.json (default: for a config.json beside a"
                             " checkpoints/ directory, as the tools write, that directory; else runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field, type-checked like the file; repeatable")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args(argv)
    interruption = Interruption()
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, interruption)
    try:
        world_size, rank, local_rank = job_position()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Once the ranks have joined, errors that can differ between nodes are raised on every rank alike
    # (Trainer), so rank 0 reports them. Before that, a node can fail alone (a file only some nodes
    # see): the first rank of each node reports too.
    say = print if rank == 0 else (lambda *_, **__: None)
    first_on_node = rank == 0 or local_rank == 0

    def say_on_each_node(message: str) -> None:
        if first_on_node:
            print(message if rank == 0 else f"rank {rank}: {message}", file=sys.stderr)

    try:
        config = load_config(args.config, args.overrides, world_size=world_size)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(Path(args.config))
    except ConfigError as e:
        say_on_each_node(f"error: {e}")
        return 2
    try:
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)  # on every rank, before any waits for another
    except OSError as e:
        say_on_each_node(f"error: run directory {run_dir} cannot be used: "
                         + ("it is a file" if isinstance(e, FileExistsError) and run_dir.is_file()  # it can be stat'ed
                            else str(e.strerror or e)))
        return 2
    try:
        with interruption.interruptible():
            init_distributed_from_env(config.parallel.timeout_s, even_alone=config.deepspeed.enabled)
    except LaunchError as e:
        say_on_each_node(f"error: {e}")
        return 2
    except dist.DistError as e:
        cause = str(e).splitlines()[0][:300]
        if "EADDRINUSE" in str(e):  # rank 0 could not listen: nothing to wait for
            say_on_each_node(f"error: MASTER_PORT {os.environ.get('MASTER_PORT')} on {os.environ.get('MASTER_ADDR')} is in"
                             f" use by another process: start the job with another port ({cause})")
            return 2
        # the rendezvous timed out: a rank failed (or never started) before joining
        print(f"error: rank {rank} of {world_size}: not every rank joined the job within parallel.timeout_s="
              f"{config.parallel.timeout_s:g} s; one that stopped before joining says why in its log: {cause}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # arrives once the rendezvous returns: it blocks in C++, up to parallel.timeout_s
        say_on_each_node("interrupted while the job started; nothing was trained")
        if created:
            remove_unused_run_directory(run_dir)
        if dist.is_initialized():
            dist.destroy_process_group()
        return interruption.exit_status
    try:
        summary = train(config, run_dir, interruption)
    except RunStopped as e:
        say(f"stopped by SIGTERM at the end of step {e.step}; " + (
            f"run again to resume from {e.checkpoint}" if config.checkpoint.resume else
            f"saved {e.checkpoint}, but checkpoint.resume is false: continue from it with checkpoint.load"), file=sys.stderr)
        return 128 + signal.SIGTERM
    except RUN_ERRORS as e:
        if raised_while_interrupted(e):
            return interrupted(config, run_dir, say, interruption.exit_status)
        say(f"error: {e}", file=sys.stderr)
        if created:  # a run that failed before it wrote anything leaves no empty directory behind
            remove_unused_run_directory(run_dir)
        return 1
    except KeyboardInterrupt:
        return interrupted(config, run_dir, say, interruption.exit_status)
    except RuntimeError as e:
        if raised_while_interrupted(e):
            return interrupted(config, run_dir, say, interruption.exit_status)
        if not peer_failure(e):
            raise
        time.sleep(PEER_SIGNAL_GRACE_S)
        if interruption.seen:  # this rank waited in a collective when an interrupted peer left it
            return interrupted(config, run_dir, say, interruption.exit_status)
        print(f"error: rank {dist.get_rank()} of {dist.get_world_size()}: a collective failed because another rank "
              f"died or stopped responding for parallel.timeout_s={config.parallel.timeout_s:g} s (see that rank's "
              f"log): {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            # free what still holds gloo work or groups (a failed run's trainer, in reference cycles) while the
            # interpreter is whole: gloo objects destroyed at interpreter shutdown abort the process (SIGABRT,
            # "terminate called without an active exception") instead of ending it with the status above
            gc.collect()
            dist.destroy_process_group()
    if rank == 0:
        print(f"done: {summary['steps']} steps, final train loss {summary['final_train_loss']:.4f}, "
              f"validation loss {summary['final_val_loss']:.4f}, {summary['tokens_per_second']:,.0f} tokens/s; "
              f"summary in {run_dir / 'summary.json'}")
    return 0


def train(config, run_dir: Path, interruption: Interruption) -> dict:
    """The run's summary. A SIGTERM before training starts (while the job is set up) interrupts at once:
    there is nothing to save yet."""
    with interruption.interruptible():
        parallel = init_parallel(config)
        device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else None
        trainer = Trainer(config, run_dir, device=device, parallel=parallel)
    with interruption.interruptible(sigterm_stops_at_step_end=config.checkpoint.save_on_sigterm):
        return trainer.train(stop_requested=interruption.stop_requested)


def raised_while_interrupted(error: BaseException) -> bool:
    """Whether `error` replaced our KeyboardInterrupt as it unwound: torch.save's zip writer, cut off
    mid-checkpoint, raises its own RuntimeError in its place (the checkpoint stays unpublished)."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__context__
    return False


def interrupted(config, run_dir: Path, say, exit_status: int) -> int:
    try:
        source = checkpoint_to_resume(config, run_dir)
    except CheckpointError:
        source = None
    say(f"interrupted; run again to resume from {source}" if source else
        "interrupted; no checkpoint to resume from (none written yet, or checkpoint.resume is false)", file=sys.stderr)
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
