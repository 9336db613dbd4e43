"""Crash safety and bad input: SIGKILL mid-run and mid-save resume to the uninterrupted losses;
non-finite steps are skipped, counted and stop the run after K in a row; no checkpoint holds a NaN;
bad checkpoints and data end with one clear error and leave the run directory as it was."""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_unipool.data import IndexedDataset, IndexedDatasetWriter
from megatron_unipool.training import (CheckpointError, DataError, NonFiniteError, RunStopped, Trainer,
                                       latest_checkpoint)
from megatron_unipool.config import config_to_dict
from megatron_unipool.training.checkpoint import (changed_settings, check_same_head_split, load_checkpoint,
                                                  load_trained_model, nan_tensors, save_checkpoint, set_rng_state)

REPO = Path(__file__).resolve().parents[1]
UNIPOOL = "configs/tiny_unipool_cpu.json"


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Weights, buffers (balancing statistics, router bias) and optimizer state."""
    tensors = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    tensors.update({k: v.detach().clone() for k, v in trainer.backend.optimizer_tensors().items()})
    return tensors


def poison(trainer: Trainer, steps: set[int], where: str) -> None:
    """Make the gradient ("grad") or the loss ("loss") of the given 1-based steps non-finite."""
    compute = trainer.compute_gradients

    def poisoned():
        totals = compute()
        if trainer.state.step + 1 in steps:
            if where == "grad":
                next(trainer.model.parameters()).grad[0, 0] = float("nan")
            else:
                totals[0] = float("inf")
        return totals

    trainer.compute_gradients = poisoned


@pytest.mark.parametrize("where, lag, lock", [("grad", "step", False), ("loss", "step", False),
                                              ("loss", "micro_batch", False), ("grad", "step", True)])
def test_non_finite_step_changes_nothing_and_is_counted(where, lag, lock, tiny_config, tmp_path):
    """micro_batch lag updates f_bar inside the step: a skipped step must give that back too; nor may
    its routing count towards the UniPool lock's window (the lock's state is in the snapshot)."""
    locking = ["moe.lock_start_step=6", "moe.lock_window_steps=4"] if lock else []
    config = tiny_config(UNIPOOL, "train.max_steps=4", "train.eval_interval=0", "moe.bias_balancing=true",
                         f"moe.pool_aux_lag={lag}", *locking)
    trainer = Trainer(config, tmp_path)
    poison(trainer, {3}, where)
    trainer.train_step()
    trainer.train_step()
    before = snapshot(trainer)
    metrics, _ = trainer.train_step()
    after = snapshot(trainer)
    assert not math.isfinite(metrics["lm_loss" if where == "loss" else "grad_norm"])
    assert metrics["skipped_steps"] == 1 and trainer.state.consecutive_skips == 1
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    metrics, _ = trainer.train_step()  # the next batch trains normally
    assert math.isfinite(metrics["lm_loss"]) and trainer.state.consecutive_skips == 0
    assert trainer.state.skipped_steps == 1 and trainer.state.consumed_samples == 4 * config.train.global_batch


def test_a_skipped_steps_loss_is_null_in_the_strict_json_summary(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(UNIPOOL, "train.max_steps=3", "train.eval_interval=0"), tmp_path)
    poison(trainer, {2}, "loss")
    returned = trainer.train()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    written = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert math.isinf(returned["train_losses"][1]) and written["train_losses"][1] is None
    assert written["train_losses"][::2] == returned["train_losses"][::2] and written["skipped_steps"] == 1


def test_an_update_applied_despite_a_non_finite_loss_stops_the_run(tiny_config, tmp_path):
    """Under ZeRO DeepSpeed decides the skip itself, from its own overflow check: where that check was off
    (options the config now refuses) it applied a NaN step, which was counted as a healthy one."""
    trainer = Trainer(tiny_config(UNIPOOL, "train.max_steps=2", "train.eval_interval=0"), tmp_path)
    poison(trainer, {1}, "loss")
    trainer.backend.step = lambda skip: (1.0, True)  # an engine that did not see the overflow
    with pytest.raises(NonFiniteError, match="step 1: the loss was not finite .* but DeepSpeed applied the update"):
        trainer.train_step()


def test_consecutive_non_finite_steps_stop_the_run_without_saving(tiny_config, tmp_path, capsys):
    config = tiny_config(UNIPOOL, "train.max_steps=10", "train.eval_interval=0", "checkpoint.save_interval=2",
                         "train.max_consecutive_skips=3")
    trainer = Trainer(config, tmp_path)
    poison(trainer, {3, 5, 6, 7, 8}, "grad")  # step 4 resets the count; 5, 6, 7 stop the run
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(up to step 7\).*step_0000006, holds finite weights"):
        trainer.train()
    assert "step 3: non-finite loss or gradient" in capsys.readouterr().out
    assert trainer.state.skipped_steps == 4
    checkpoints = tmp_path / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step_0000006"
    assert not nan_tensors(load_checkpoint(latest_checkpoint(checkpoints)))


def test_a_checkpoint_holding_nan_is_refused_and_the_previous_one_kept(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(UNIPOOL, "train.max_steps=2", "train.eval_interval=0"), tmp_path)
    trainer.train()
    with torch.no_grad():
        trainer.model.final_norm.weight[0] = float("nan")
    trainer.state.step = 3
    with pytest.raises(CheckpointError, match=r"step 3 checkpoint: NaN in model\.final_norm\.weight"):
        trainer.save()
    checkpoints = tmp_path / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step_0000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000002"]


def test_save_keeps_the_last_n_and_points_latest_at_the_newest(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000003", "step_0000004"]
    assert torch.load(latest_checkpoint(tmp_path) / "state.pt")["w"].tolist() == [4.0, 4.0]
    # step 4 again (a branch that went back past it): the new state replaces the abandoned one
    save_checkpoint(tmp_path, 4, {"w": torch.full((2,), 9.0)}, keep_last=2)
    assert torch.load(latest_checkpoint(tmp_path) / "state.pt")["w"].tolist() == [9.0, 9.0]


def test_a_full_disk_while_saving_is_one_error_and_frees_the_space(tmp_path):
    """torch.save's zip writer replaced the OSError of a full disk by a RuntimeError of its own ("unexpected
    pos"): a traceback, and the half-written checkpoint kept the disk full. A file size limit fails a write
    as a full disk does (EFBIG, with SIGXFSZ ignored)."""
    import resource
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(4)}, keep_last=2)
    handler, limits = signal.getsignal(signal.SIGXFSZ), resource.getrlimit(resource.RLIMIT_FSIZE)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        with pytest.raises(CheckpointError, match=r"^cannot write the step 2 checkpoint in .*: File too large"):
            save_checkpoint(tmp_path, 2, {"w": torch.zeros(1 << 20)}, keep_last=2)  # 4 MiB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]
    assert torch.load(latest_checkpoint(tmp_path) / "state.pt")["w"].tolist() == [0.0] * 4


def test_a_summary_that_cannot_be_written_is_one_error(tiny_config, tmp_path, monkeypatch):
    """An OSError writing summary.json at the end of a run (a full disk) was a traceback."""
    import errno
    from megatron_unipool.training import metrics

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(metrics, "save_atomically", full_disk)
    with pytest.raises(CheckpointError, match=r"^trained to step 1 \(checkpoints saved as configured\), but cannot"
                                              r" write .*summary\.json: No space left on device \(.*summary\.json\)$"):
        Trainer(tiny_config(UNIPOOL, "train.max_steps=1", "train.eval_interval=0"), tmp_path / "run").train()


def test_a_kill_while_a_step_is_saved_again_keeps_the_checkpoint_latest_names(tmp_path, monkeypatch):
    """A run that went back saves the step `latest` names again: the old checkpoint was deleted before the
    new one took its name, so a kill in between left `latest` naming nothing. Now it is set aside and
    resumed from until the swap is done; a finished save leaves nothing of it."""
    save_checkpoint(tmp_path, 4, {"w": torch.full((2,), 4.0)}, keep_last=2)
    real_replace = os.replace

    def killed_before_the_new_checkpoint_is_renamed(source, target):
        if Path(source).name == ".step_0000004.tmp":
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_before_the_new_checkpoint_is_renamed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, {"w": torch.full((2,), 9.0)}, keep_last=2)
    monkeypatch.setattr(os, "replace", real_replace)
    assert torch.load(latest_checkpoint(tmp_path) / "state.pt")["w"].tolist() == [4.0, 4.0]
    save_checkpoint(tmp_path, 4, {"w": torch.full((2,), 9.0)}, keep_last=2)
    assert torch.load(latest_checkpoint(tmp_path) / "state.pt")["w"].tolist() == [9.0, 9.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000004"]


@pytest.mark.parametrize("content, error", [(b"\xff\xfe", "latest is damaged: not text"),
                                            (b"", "latest is damaged: it holds '', not the name of a step_"),
                                            (b"../elsewhere", "latest is damaged: it holds '../elsewhere'"),
                                            (b"global_step4", "holds a DeepSpeed engine checkpoint")])
def test_a_damaged_latest_pointer_is_named(tmp_path, content, error):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, keep_last=1)
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(CheckpointError, match=error):
        latest_checkpoint(tmp_path)


def test_pruning_orders_steps_by_number_and_never_deletes_the_new_checkpoint(tmp_path):
    """By name, step_10000000 sorts before step_9999999, and higher steps left by an earlier run sort
    after the one just written: either way the new checkpoint was deleted and `latest` dangled."""
    for step in (9_999_998, 9_999_999, 10_000_000, 10_000_001):
        save_checkpoint(tmp_path / "past", step, {"w": torch.zeros(1)}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "past").iterdir()) == ["latest", "step_10000000", "step_10000001"]
    for step in (50, 60, 3):  # steps 50 and 60 of an earlier run in the same directory
        save_checkpoint(tmp_path / "rerun", step, {"w": torch.zeros(1)}, keep_last=2)
    assert latest_checkpoint(tmp_path / "rerun").name == "step_0000003"
    assert sorted(p.name for p in (tmp_path / "rerun").iterdir()) == ["latest", "step_0000003", "step_0000050",
                                                                       "step_0000060"]
    save_checkpoint(tmp_path / "rerun", 4, {"w": torch.zeros(1)}, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "rerun").iterdir()) == ["latest", "step_0000004", "step_0000050",
                                                                       "step_0000060"]
    (tmp_path / "rerun" / ".step_0000005.tmp").mkdir()  # a save of step 5 killed half-way
    save_checkpoint(tmp_path / "rerun", 6, {"w": torch.zeros(1)}, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "rerun").iterdir()) == ["latest", "step_0000006", "step_0000050",
                                                                       "step_0000060"]


def test_the_step_0_checkpoint_a_tool_wrote_outlives_the_runs_that_continue_from_it(tmp_path):
    """tools/upcycle.py and convert_checkpoint.py write OUT/checkpoints/step_0000000, and OUT/config.json's
    checkpoint.load names it: a run continued in OUT must not prune it, or another --run-dir started from
    that config finds nothing."""
    save_checkpoint(tmp_path, 0, {"w": torch.zeros(1)}, keep_last=1)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.full((1,), float(step))}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000000", "step_0000003"]
    assert latest_checkpoint(tmp_path).name == "step_0000003"


def test_going_back_to_an_earlier_checkpoint_keeps_it_while_the_new_branch_is_short(tiny_config, tmp_path):
    """checkpoint.load of step 2 in a directory that holds steps 2 and 4: the saves of the new branch
    must not delete step 2 for the abandoned step 4 (a rerun of the same command found nothing to load)."""
    overrides = ["train.max_steps=4", "checkpoint.save_interval=2", "checkpoint.keep_last=2", "train.eval_interval=0"]
    Trainer(tiny_config(UNIPOOL, *overrides), tmp_path).train()
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000002", "step_0000004"]
    back = Trainer(tiny_config(UNIPOOL, "train.max_steps=3", "checkpoint.save_interval=1", "checkpoint.keep_last=2",
                               "checkpoint.resume=false", f"checkpoint.load={checkpoints / 'step_0000002'}"), tmp_path)
    back.train()
    assert latest_checkpoint(checkpoints).name == "step_0000003"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000002", "step_0000003", "step_0000004"]


@pytest.mark.parametrize("stop_after", [3, 4], ids=["between-saves", "at-a-save"])
def test_a_stop_request_saves_that_step_and_the_rerun_continues_the_run(stop_after, tiny_config, tmp_path,
                                                                         monkeypatch):
    """What SIGTERM does under the launcher: the trainer saves the step it finished (once, if it was due
    anyway), flushes TensorBoard and stops; the rerun continues the uninterrupted run's curves, and
    TensorBoard shows each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ["train.max_steps=6", "checkpoint.save_interval=4", "train.eval_interval=2", "logging.tensorboard=true"]
    whole = Trainer(tiny_config(UNIPOOL, *overrides), tmp_path / "whole").train()
    run = tmp_path / "stopped"
    trainer = Trainer(tiny_config(UNIPOOL, *overrides), run)
    saves = []
    save = trainer.save
    monkeypatch.setattr(trainer, "save", lambda: saves.append(trainer.state.step) or save())
    with pytest.raises(RunStopped) as stopped:
        trainer.train(stop_requested=lambda: trainer.state.step >= stop_after)
    checkpoint = run / "checkpoints" / f"step_{stop_after:07d}"
    assert (stopped.value.step, stopped.value.checkpoint) == (stop_after, checkpoint)
    assert saves == [stop_after] and latest_checkpoint(run / "checkpoints") == stopped.value.checkpoint
    assert not (run / "summary.json").exists()
    logged = EventAccumulator(str(run / "tensorboard")).Reload().Scalars("train/lm_loss")
    assert [e.step for e in logged] == list(range(1, stop_after + 1))
    resumed = Trainer(tiny_config(UNIPOOL, *overrides), run).train()
    assert resumed["train_losses"] == whole["train_losses"] and resumed["val_losses"] == whole["val_losses"]
    logged = EventAccumulator(str(run / "tensorboard")).Reload().Scalars("train/lm_loss")
    assert [e.step for e in logged] == list(range(1, 7))
    assert [e.value for e in logged] == pytest.approx(whole["train_losses"], rel=1e-6)


# ------------------------------------------------------------------ bad checkpoints


@pytest.fixture
def saved_run(tiny_config, tmp_path):
    """A 2-step run directory with its checkpoint, and a copy of its files to check nothing changes."""
    run = tmp_path / "run"
    Trainer(tiny_config(UNIPOOL, "train.max_steps=2", "train.eval_interval=0"), run).train()
    return run, {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def unchanged(run: Path, files: dict[Path, bytes]) -> bool:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_missing_partial_and_dangling_checkpoints_are_named(saved_run, tiny_config, tmp_path):
    run, files = saved_run
    with pytest.raises(CheckpointError, match="no checkpoint at .*nowhere"):
        Trainer(tiny_config(UNIPOOL, f"checkpoint.load={tmp_path / 'nowhere'}"), tmp_path / "other")
    (tmp_path / "notes.json").write_text("{}")  # a file, but not one torch.save wrote: what a checkpoint may be
    with pytest.raises(CheckpointError, match=r"no checkpoint at \S+notes.json: expected a run directory"):
        Trainer(tiny_config(UNIPOOL, f"checkpoint.load={tmp_path / 'notes.json'}"), tmp_path / "other")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "state.pt").write_bytes((run / "checkpoints/step_0000002/state.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"partial/state.pt is not a torch.save archive \(truncated"):
        Trainer(tiny_config(UNIPOOL, f"checkpoint.load={partial}"), tmp_path / "other")
    (partial / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"partial/state.pt is empty$"):
        Trainer(tiny_config(UNIPOOL, f"checkpoint.load={partial}"), tmp_path / "other")
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "checkpoints").mkdir()
    (dangling / "checkpoints" / "latest").write_text("step_0000009")
    with pytest.raises(CheckpointError, match="latest names step_0000009, which has no state.pt$"):
        Trainer(tiny_config(UNIPOOL), dangling)
    earlier = dangling / "checkpoints" / "step_0000002"  # a whole earlier checkpoint: the error names it
    earlier.mkdir()
    (earlier / "state.pt").write_bytes((run / "checkpoints/step_0000002/state.pt").read_bytes())
    hint = f"; {earlier} is whole: load it instead (the launcher: --set checkpoint.resume=false --set checkpoint.load={earlier})"
    with pytest.raises(CheckpointError, match="which has no state.pt" + re.escape(hint) + "$"):
        Trainer(tiny_config(UNIPOOL), dangling)
    (dangling / "checkpoints" / "step_0000009").mkdir()
    (dangling / "checkpoints" / "step_0000009" / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="step_0000009/state.pt is empty" + re.escape(hint) + "$"):
        Trainer(tiny_config(UNIPOOL), dangling)
    (dangling / "checkpoints" / "step_0000005").mkdir()  # not whole: the hint passes over it
    (dangling / "checkpoints" / "step_0000005" / "state.pt").write_bytes(b"cut short")
    with pytest.raises(CheckpointError, match="step_0000009/state.pt is empty" + re.escape(hint) + "$"):
        Trainer(tiny_config(UNIPOOL), dangling)
    assert unchanged(run, files)


def test_without_its_latest_pointer_a_run_resumes_from_its_highest_whole_checkpoint(tiny_config, tmp_path):
    """What a save killed between its rename and the pointer's write leaves (or a removed pointer): the rerun
    continues from the highest step_* with a state.pt, not from step 0 over the checkpoints."""
    overrides = ["train.max_steps=4", "checkpoint.save_interval=2", "checkpoint.keep_last=2", "train.eval_interval=0"]
    Trainer(tiny_config(UNIPOOL, *overrides), tmp_path).train()
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "latest").unlink()
    (checkpoints / "step_0000005").mkdir()  # a directory without a state.pt is not a checkpoint
    assert latest_checkpoint(checkpoints).name == "step_0000004"
    resumed = Trainer(tiny_config(UNIPOOL, *overrides[:1], "train.max_steps=6", *overrides[1:]), tmp_path)
    assert resumed.state.step == 4


def test_a_fresh_run_is_refused_where_its_saves_would_overwrite_checkpoints(saved_run, tiny_config):
    """checkpoint.resume=false without checkpoint.load in a run directory that holds checkpoints: refused,
    nothing touched; with checkpoint.load it is the going-back branch (tested above), allowed."""
    run, files = saved_run
    (run / "checkpoints" / "step_0000003").mkdir()  # no state.pt: not a checkpoint, not counted
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"checkpoints holds 1 checkpoint\(s\), up to step_0000002, that a fresh"
                                              r" run \(checkpoint.resume=false\) would overwrite: use another --run-dir"):
        Trainer(tiny_config(UNIPOOL, "checkpoint.resume=false"), run)
    assert unchanged(run, files)


def test_a_run_directory_that_takes_no_file_is_refused_naming_why(tmp_path, monkeypatch):
    """os.access's answer was reported as "permission denied" whatever the cause (a read-only file system
    too). A file is tried now, and the refusal says why it failed."""
    import errno
    import tempfile
    from megatron_unipool.training.checkpoint import check_run_directory

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(CheckpointError, match=f"^run directory {tmp_path}: cannot write in {tmp_path}"
                                              r" \(Read-only file system\)$"):
        check_run_directory(tmp_path)


def test_saved_rng_state_restores_torch_numpy_and_python_generators(tmp_path):
    """Through a real save and load (weights_only types): the same draws from every generator."""
    import random

    from megatron_unipool.training.checkpoint import rng_state

    save_checkpoint(tmp_path, 1, {"rng": rng_state()}, keep_last=1)
    draws = (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random())
    set_rng_state(torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=True)["rng"])
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()) == draws


def test_a_checkpoint_that_does_not_fit_names_every_misfit(saved_run):
    """Missing, unexpected and reshaped tensors are each named, by the trainer's restore and by the
    check the tools run before writing a run directory (not a RuntimeError at the next launch)."""
    from megatron_unipool.training.checkpoint import check_fits, restore_model

    run, files = saved_run
    state_file = run / "checkpoints" / "step_0000002" / "state.pt"
    path, payload, config, model = load_trained_model(state_file)  # the state.pt itself is accepted too
    assert path == state_file
    state = dict(payload["model"])
    del state["final_norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["output.weight"] = torch.zeros(3, 3)
    shape = tuple(model.output.weight.shape)
    for check in (lambda: restore_model(model, state, path), lambda: check_fits(config, state, "the weights")):
        with pytest.raises(CheckpointError) as error:
            check()
        assert "missing final_norm.weight" in str(error.value) and "unexpected extra.weight" in str(error.value)
        assert f"output.weight: checkpoint (3, 3) vs model {shape}" in str(error.value)
    assert unchanged(run, files)


def test_a_foreign_torch_file_is_named_not_a_key_error(saved_run, tiny_config, tmp_path):
    run, files = saved_run
    foreign = tmp_path / "foreign" / "step_0000001"
    foreign.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign / "state.pt")
    message = (r"foreign/step_0000001/state.pt is not a megatron_unipool checkpoint"
               r" \(missing model, optimizer, train_state, rng, config\)")
    with pytest.raises(CheckpointError, match=message):
        load_trained_model(foreign)  # tools/convert_checkpoint.py, tools/upcycle.py
    with pytest.raises(CheckpointError, match=message):
        Trainer(tiny_config(UNIPOOL, f"checkpoint.load={foreign}"), tmp_path / "other")
    torch.save(torch.zeros(2), foreign / "state.pt")  # not even a dict
    with pytest.raises(CheckpointError, match="is not a megatron_unipool checkpoint"):
        load_trained_model(foreign)
    assert unchanged(run, files)


class _RunsCodeWhenUnpickled:
    """What a crafted checkpoint could hold: unpickling it calls a function of the attacker's choice."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_loading_a_checkpoint_cannot_run_code_and_older_ones_still_load(saved_run, tmp_path):
    """weights_only=True: a pickled callable is refused before it runs; a checkpoint of the earlier
    format (numpy's RNG keys as an array) still loads and restores the RNG."""
    run, _ = saved_run
    payload = torch.load(run / "checkpoints/step_0000002/state.pt", weights_only=False)
    crafted = tmp_path / "crafted" / "step_0000002"
    crafted.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save({**payload, "config": _RunsCodeWhenUnpickled(marker)}, crafted / "state.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(crafted)
    assert not marker.exists()

    older = tmp_path / "older" / "step_0000002"
    older.mkdir(parents=True)
    np.random.seed(7)
    torch.save({**payload, "rng": {**payload["rng"], "numpy": np.random.get_state()}}, older / "state.pt")
    expected = np.random.rand(3)
    np.random.seed(8)
    set_rng_state(load_checkpoint(older)["rng"])
    assert np.array_equal(np.random.rand(3), expected)


def test_a_rerun_resumes_its_own_latest_not_checkpoint_load(saved_run, tiny_config, tmp_path):
    """checkpoint.load starts a new run directory; a rerun there continues from its own checkpoint."""
    run, files = saved_run
    config = tiny_config(UNIPOOL, "train.max_steps=3", "train.eval_interval=0", f"checkpoint.load={run}")
    first = Trainer(config, tmp_path / "continued")
    assert first.state.step == 2  # from the loaded run
    first.train()
    again = Trainer(config, tmp_path / "continued")
    assert again.state.step == 3 and again.state.train_losses == first.state.train_losses
    assert unchanged(run, files)


def test_the_last_step_is_saved_before_the_final_evaluation(tiny_config, tmp_path, monkeypatch):
    """A final evaluation that fails (a node lost during it, or a hang until parallel.timeout_s) must not cost
    the trained steps: the last step is checkpointed first, and the rerun only evaluates, to the same
    losses as the run that never failed."""
    settings = (UNIPOOL, "train.max_steps=3", "train.eval_interval=0")
    uninterrupted = Trainer(tiny_config(*settings), tmp_path / "uninterrupted").train()
    trainer = Trainer(tiny_config(*settings), tmp_path / "run")

    def lost_node():
        raise RuntimeError("a collective failed because another rank died")

    monkeypatch.setattr(trainer, "evaluate", lost_node)
    with pytest.raises(RuntimeError, match="another rank died"):
        trainer.train()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000003"
    rerun = Trainer(tiny_config(*settings), tmp_path / "run").train()
    assert rerun["train_losses"] == uninterrupted["train_losses"]
    assert rerun["val_losses"] == uninterrupted["val_losses"] == [[3, uninterrupted["final_val_loss"]]]


def test_resuming_at_max_steps_evaluates_and_a_changed_schedule_is_announced(tiny_config, tmp_path, capsys):
    """A checkpoint without an evaluation (step 2 of 4, eval_interval=0) resumed with max_steps=2
    trains nothing but still ends with its validation loss; resumed with max_steps=8 it says the
    learning-rate decay changed, and to what."""
    from megatron_unipool.training.optimizer import learning_rate

    warmup = "train.warmup_steps=1"  # step 3 is in the decay, which max_steps shapes
    Trainer(tiny_config(UNIPOOL, "train.max_steps=4", "checkpoint.save_interval=2", "train.eval_interval=0", warmup),
            tmp_path / "run").train()
    midway = tmp_path / "run" / "checkpoints" / "step_0000002"
    capsys.readouterr()
    short = tiny_config(UNIPOOL, "train.max_steps=2", "train.eval_interval=0", warmup, f"checkpoint.load={midway}")
    summary = Trainer(short, tmp_path / "short").train()
    assert summary["steps"] == 2 and len(summary["train_losses"]) == 2
    assert [step for step, _ in summary["val_losses"]] == [2] and math.isfinite(summary["final_val_loss"])
    assert "nothing left to train" in capsys.readouterr().out
    longer = tiny_config(UNIPOOL, "train.max_steps=8", "train.eval_interval=0", warmup, f"checkpoint.load={midway}")
    Trainer(longer, tmp_path / "longer")
    was = learning_rate(2, tiny_config(UNIPOOL, "train.max_steps=4", warmup).train)
    now = learning_rate(2, longer.train)
    assert now != was
    out = capsys.readouterr().out
    assert f"the learning-rate decay is recomputed, the next step's rate is {now:.3e} (was {was:.3e})\n" in out
    assert "model.seq_len" not in out
    # warmup-stable-decay: a checkpoint of the stable phase extends at lr, and the note says where the cool-down moved
    wsd = ["train.lr_decay=wsd", "train.lr_cooldown_steps=2", "train.eval_interval=0", "train.lr=2e-3",
           "train.min_lr=2e-4", warmup]
    stable = Trainer(tiny_config(UNIPOOL, "train.max_steps=4", "checkpoint.save_interval=2", *wsd), tmp_path / "wsd")
    assert [stable.train_step()[0]["lr"] for _ in range(4)] == pytest.approx([2e-3, 2e-3, 1e-3 + 1e-4, 2e-4])
    assert stable.backend.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)  # what the last step applied
    Trainer(tiny_config(UNIPOOL, "train.max_steps=4", "checkpoint.save_interval=2", *wsd), tmp_path / "wsd2").train()
    capsys.readouterr()
    extended = Trainer(tiny_config(UNIPOOL, "train.max_steps=8", *wsd,
                                   f"checkpoint.load={tmp_path / 'wsd2' / 'checkpoints' / 'step_0000002'}"),
                       tmp_path / "extended")
    assert ("the next step's rate is 2.000e-03 (was 1.100e-03); the cool-down (train.lr_cooldown_steps=2) now starts"
            " at step 7") in capsys.readouterr().out
    assert [extended.train_step()[0]["lr"] for _ in range(6)] == pytest.approx([2e-3] * 4 + [1.1e-3, 2e-4])
    # branched shorter than the cool-down: the run continues inside it
    Trainer(tiny_config(UNIPOOL, "train.max_steps=3", *wsd,
                        f"checkpoint.load={tmp_path / 'wsd2' / 'checkpoints' / 'step_0000002'}"), tmp_path / "branch")
    assert ("the next step's rate is 2.000e-04 (was 1.100e-03); the cool-down (train.lr_cooldown_steps=2) began at step 2,"
            " before this resume: the run continues inside it") in capsys.readouterr().out
    # "was": the checkpoint's own schedule, here the cosine one, not the resumed run's
    Trainer(tiny_config(UNIPOOL, "train.max_steps=8", *wsd, f"checkpoint.load={midway}"), tmp_path / "to_wsd")
    assert was != 2e-3 and f"the next step's rate is 2.000e-03 (was {was:.3e})" in capsys.readouterr().out
    # a sequence length changed on resume: the sample position counts samples of another length
    Trainer(tiny_config(UNIPOOL, "train.max_steps=4", "model.seq_len=32", f"checkpoint.load={midway}"),
            tmp_path / "shorter_sequences")
    assert ("note: model.seq_len=32, the checkpoint's run had 64: the run continues at sample 16 of 32-token samples,"
            " not at the token where the checkpoint's data stopped") in capsys.readouterr().out


def test_a_resume_under_another_head_split_is_refused_and_other_changes_are_named(saved_run, tiny_config, tmp_path,
                                                                                  capsys):
    """8 heads of 16 and 4 KV heads fit every tensor of 4 heads of 32 and 2 KV heads: it resumed silently as
    another model. A RoPE base (longer contexts), routing or a seed may change on purpose: each is named."""
    run, files = saved_run
    with pytest.raises(CheckpointError) as error:
        Trainer(tiny_config(UNIPOOL, "model.num_heads=8", "model.num_kv_heads=4", f"checkpoint.load={run}"),
                tmp_path / "heads")
    assert str(error.value) == (f"checkpoint {run / 'checkpoints' / 'step_0000002'} was trained with another attention"
                                " head split: model.num_heads=8 (the checkpoint's is 4), model.num_kv_heads=4 (the"
                                " checkpoint's is 2); its tensors fit, but each head would read another's weights:"
                                " set these back")
    assert unchanged(run, files) and not (tmp_path / "heads" / "checkpoints").exists()
    capsys.readouterr()
    Trainer(tiny_config(UNIPOOL, "model.rope_base=500000", "moe.top_k=2", "train.seed=7", "model.expert_gemm=loop",
                        "moe.router_tf32=true", "moe.pool_size=32", "train.lr=0.01", "train.adamw=foreach",
                        f"checkpoint.load={run}"), tmp_path / "changed")
    out = capsys.readouterr().out
    # kernels compute the same function, and the full pool of 32 is the unset pool_size: neither is named
    assert ("note: resumed with settings other than the checkpoint's: model.rope_base=500000.0 (was 10000.0),"
            " moe.top_k=2 (was 1), train.lr=0.01 (was 0.002)\n") in out
    assert "note: train.seed=7, the checkpoint's run had 1234: the rest of the epoch is read in another order" in out
    Trainer(tiny_config(UNIPOOL, "train.max_steps=2", "train.eval_interval=0", f"checkpoint.load={run}"),
            tmp_path / "same")
    assert "note:" not in capsys.readouterr().out


def test_the_resume_note_names_changed_data_and_leaves_out_where_the_cache_lives(tiny_config):
    config = tiny_config(UNIPOOL)
    saved = config_to_dict(config)
    saved["data"] = dict(saved["data"], corpus=None, train_prefix="old/ds_train", valid_prefix="old/ds_valid",
                         cache_dir="elsewhere")
    assert changed_settings(saved, config) == {"data.corpus": (None, "shakespeare"), "data.train_prefix": (
        "old/ds_train", None), "data.valid_prefix": ("old/ds_valid", None)}
    saved["data"].update(corpus="shakespeare", train_prefix=None, valid_prefix=None, tokenizer="gpt2")
    assert changed_settings(saved, config) == {"data.tokenizer": ("gpt2", "byte")}
    # a checkpoint of step 0 (an import, an upcycled model): its tools leave train and data to be set now
    saved["train"]["lr"] = 0.5
    assert changed_settings(saved, config, trained_steps=0) == {}


def test_checkpoint_of_another_shape_names_the_tensors_that_differ(saved_run, tiny_config, tmp_path):
    run, files = saved_run
    with pytest.raises(CheckpointError) as error:  # another head split too: the tensors are what tells it
        Trainer(tiny_config(UNIPOOL, "moe.pool_size=24", "model.num_heads=8", f"checkpoint.load={run / 'checkpoints'}"),
                tmp_path / "other")
    message = str(error.value)
    assert "does not fit this model" in message
    assert "expert_pools.0.w_gate: checkpoint (32, " in message and "vs model (24, " in message
    assert "embedding" not in message  # only what differs
    assert unchanged(run, files)


# ------------------------------------------------------------------ bad data


def write(prefix: Path, documents: list[list[int]], vocab_size: int, eod_id: int, tokenizer: str = "test") -> str:
    with IndexedDatasetWriter(str(prefix), vocab_size, eod_id, tokenizer) as writer:
        for doc in documents:
            writer.add_document(np.array(doc))
    return str(prefix)


def test_data_errors_name_the_file_and_the_problem(tiny_config, tmp_path):
    rng = np.random.default_rng(0)
    long = [rng.integers(0, 200, 500).tolist() for _ in range(4)]
    train = write(tmp_path / "train", long, 256, 255)
    short = write(tmp_path / "short", [[1, 2, 3]], 256, 255)

    def build(train_prefix, valid_prefix):
        return Trainer(tiny_config(UNIPOOL, "data.corpus=null", f"data.train_prefix={train_prefix}",
                                   f"data.valid_prefix={valid_prefix}"), tmp_path / "run")

    with pytest.raises(DataError, match=r"indexed dataset file missing: .*missing\.bin|missing\.idx"):
        build(tmp_path / "missing", train)
    # either size differing, or the tokenizer's name (byte-level BPEs trained to one size differ only there)
    for vocab_size, eod_id, name in ((300, 299, "test"), (256, 254, "test"), (300, 255, "test"), (256, 255, "other")):
        other_tokenizer = write(tmp_path / f"valid_{vocab_size}_{eod_id}_{name}", long, vocab_size, eod_id, name)
        with pytest.raises(DataError, match=rf"train and validation files come from different tokenizers: .*train"
                                            rf" \(tokenizer test, vocabulary 256, EOD id 255\), .*valid_{vocab_size}_"
                                            rf"{eod_id}_{name} \(tokenizer {name}, vocabulary {vocab_size}, EOD id {eod_id}\)"):
            build(train, other_tokenizer)
    legacy = Path(write(tmp_path / "legacy", long, 256, 255, "other") + ".idx")  # rewritten as format version 1:
    raw = legacy.read_bytes()  # no tokenizer field (bytes 48-64), so only the sizes are compared
    legacy.write_bytes(raw[:8] + (1).to_bytes(4, "little") + raw[12:48] + raw[64:])
    same = write(tmp_path / "same", long, 256, 255)
    assert len(build(train, str(legacy)[:-4]).data.valid) == len(build(train, same).data.valid) > 0
    with pytest.raises(DataError, match="short"):
        build(train, short)  # fewer tokens than one sequence
    few = write(tmp_path / "few", [rng.integers(0, 200, 150).tolist()], 256, 255)  # 2 samples of 64 tokens
    with pytest.raises(DataError, match=r"few holds 2 validation samples of model.seq_len=64, fewer than"
                                        r" train.micro_batch=4.*lower train.micro_batch"):
        build(train, few)  # else the final evaluation gets no batch, after training, before the last save
    assert not (tmp_path / "run" / "checkpoints").exists()
    exactly_one_batch = write(tmp_path / "four", [rng.integers(0, 200, 4 * 64 + 1).tolist()], 256, 255)
    assert len(build(train, exactly_one_batch).data.valid) == 4  # one micro-batch is enough
    damaged = Path(write(tmp_path / "damaged", long, 256, 255) + ".bin")
    tokens = np.fromfile(damaged, dtype=np.uint16)
    tokens[::50] = 300  # in every sample: ids the index's vocabulary of 256 does not hold
    tokens.tofile(damaged)
    with pytest.raises(DataError, match=r"damaged\.bin: token id 300 in tokens .* outside the vocabulary \[0, 256\)"):
        build(damaged.with_suffix(""), train).compute_gradients()  # read as each step reads its batch
    with pytest.raises(DataError, match=r"damaged\.bin: token id 300"):
        build(train, damaged.with_suffix("")).evaluate()


def test_blend_errors_name_the_file_and_the_problem(tiny_config, tmp_path):
    rng = np.random.default_rng(0)
    long = [rng.integers(0, 200, 500).tolist() for _ in range(4)]
    web, books, valid = (write(tmp_path / name, long, 256, 255) for name in ("web", "books", "valid"))

    def build(train_blend: dict, valid_prefix):
        return Trainer(tiny_config(UNIPOOL, "data.corpus=null", f"data.train_prefix={json.dumps(train_blend)}",
                                   f"data.valid_prefix={json.dumps(valid_prefix)}"), tmp_path / "run")

    other = write(tmp_path / "other", long, 256, 255, "other")
    with pytest.raises(DataError, match=rf"^the data files come from different tokenizers: .*web \(tokenizer test,"
                                        rf" vocabulary 256, EOD id 255\), .*other \(tokenizer other, vocabulary 256,"
                                        rf" EOD id 255\), .*valid \(tokenizer test"):
        build({web: 1, other: 1}, valid)
    big = write(tmp_path / "big", long, 400, 399)
    with pytest.raises(DataError, match=r"^data.train_prefix's .*big was tokenised with a vocabulary of 400 tokens,"
                                        r" larger than model.vocab_size=320"):
        build({web: 1, big: 1}, valid)
    with pytest.raises(DataError, match=r"^data.valid_prefix's .*big was tokenised with a vocabulary of 400 tokens"):
        build({web: 1}, {valid: 1, big: 1})
    short = write(tmp_path / "short", [[1, 2, 3]], 256, 255)
    with pytest.raises(DataError, match=r"short\.bin holds 4 tokens, too few for one sample"):
        build({web: 1, short: 1}, valid)
    with pytest.raises(DataError, match=r"books's weight 1e-06 is 1e-06 of the blend, less than one sample in 65,536"):
        build({web: 1, books: 1e-6}, valid)
    few = [write(tmp_path / f"few{i}", [rng.integers(0, 200, 100).tolist()], 256, 255) for i in range(2)]
    with pytest.raises(DataError, match=r"^the blend of .*few0, .*few1 holds 2 validation samples of model.seq_len=64,"
                                        r" fewer than train.micro_batch=4"):
        build({web: 1, books: 1}, {few[0]: 1, few[1]: 1})  # a sample each: the first to run out ends the pass
    with pytest.raises(DataError, match=r"^\S*few1 holds 1 validation samples of model.seq_len=64, fewer than"
                                        r" train.micro_batch=4 .* \(data.valid_per_file evaluates each file on its own\)$"):
        Trainer(tiny_config(UNIPOOL, "data.corpus=null", f"data.train_prefix={web}", "data.valid_per_file=true",
                            f"data.valid_prefix={json.dumps({valid: 1, few[1]: 1})}"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_validation_batches_are_whole_micro_batches_spread_over_the_split():
    from megatron_unipool.training.datasets import validation_batches

    class Samples:  # sample i is [i]
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def sample(self, i):
            return np.array([i])

    def positions(n, micro_batch, sequences):
        return [batch.flatten().tolist() for batch in validation_batches(Samples(n), micro_batch, sequences)]

    assert positions(10, 4, 12) == [[0, 1, 3, 4], [5, 6, 8, 9]]  # 2 whole batches, first to last sample
    assert positions(100, 2, 4) == [[0, 33], [66, 99]]
    assert positions(4, 4, 20) == [[0, 1, 2, 3]]
    # the same sequences in any micro-batching (a memory knob), as long as the split holds them all
    assert sum(positions(100, 8, 16), []) == sum(positions(100, 2, 16), []) == sum(positions(100, 16, 16), [])


def test_data_parallel_replicas_split_the_validation_batches_only_when_they_divide_evenly():
    """Each batch to one replica when the count divides by dp; else every replica evaluates them all (a split
    too small for whole shares), which keeps both the micro-batch count equal across replicas and the mean
    that of one process."""
    from megatron_unipool.training.datasets import replica_share

    batches = list(range(8))
    assert [replica_share(batches, 4, rank) for rank in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_share(batches, 1, 0) == batches
    assert [replica_share(batches[:3], 2, rank) for rank in range(2)] == [[0, 1, 2]] * 2


def test_validation_loss_does_not_depend_on_the_micro_batch(tiny_config, tmp_path):
    """train.eval_batches counts global batches: with micro-batches counted instead, micro_batch 1, 2 and 8
    evaluated 4, 8 and 32 sequences (5.7669, 5.7799, 5.7723 for the same weights)."""
    losses = []
    for micro_batch in (2, 8):
        torch.manual_seed(0)
        trainer = Trainer(tiny_config(UNIPOOL, f"train.micro_batch={micro_batch}", "train.eval_batches=2"),
                          tmp_path / str(micro_batch))
        losses.append(trainer.evaluate().loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_training_order_follows_the_seed_and_validation_stays_in_file_order(tiny_config, tmp_path):
    from megatron_unipool.training import build_datasets

    data = [build_datasets(tiny_config(UNIPOOL, f"train.seed={seed}", "model.vocab_size=257")) for seed in (1, 2)]
    assert not torch.equal(torch.as_tensor(data[0].train.sample(0)), torch.as_tensor(data[1].train.sample(0)))
    first, second = (torch.as_tensor(data[0].valid.sample(i)) for i in (0, 1))
    assert torch.equal(first, torch.as_tensor(data[1].valid.sample(0))) and first[-1] == second[0]  # consecutive windows
    assert data[0].vocab_size == 257  # model.vocab_size equal to the tokenizer's is enough


# ------------------------------------------------------------------ SIGKILL and resume

KILL_DURING_SAVE = textwrap.dedent("""
    # Run the launcher, but SIGKILL this process halfway through writing the checkpoint of step {step}.
    import io, os, runpy, signal, sys
    import torch
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("train_state", {{}}).get("step") == {step}:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = dying_save
    sys.argv = [{launcher!r}] + sys.argv[1:]
    runpy.run_path({launcher!r}, run_name="__main__")
""")


def launch_command(run_dir: Path, data_cache: str) -> list[str]:
    sets = ["train.max_steps=12", "checkpoint.save_interval=3", "train.eval_interval=6", "logging.log_interval=1",
            "logging.tensorboard=false", f"data.cache_dir={data_cache}", "model.seq_len=32", "train.global_batch=8",
            "train.micro_batch=4", "train.eval_batches=1"]
    return [str(REPO / "launch/pretrain.py"), "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]


def run_to_end(command: list[str], run_dir: Path) -> dict:
    done = subprocess.run([sys.executable] + command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(data_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return run_to_end(launch_command(run_dir, data_cache), run_dir)


def signalled(command: list[str], at_line: str, sig: signal.Signals) -> tuple[int, str]:
    """Run the launcher, send `sig` when it prints a line starting with `at_line`: (exit status, stderr)."""
    process = subprocess.Popen([sys.executable] + command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                               # a pytest started in the background (nohup, &) passes SIGINT ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in process.stdout:
            if line.startswith(at_line):
                process.send_signal(sig)
                break
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    return process.returncode, stderr


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_losses(uninterrupted, data_cache, tmp_path):
    run_dir = tmp_path / "run"
    command = launch_command(run_dir, data_cache)
    # after the step-6 checkpoint, before the step-9 one
    status, _ = signalled(command, "step  8/12", signal.SIGKILL)
    assert status == -signal.SIGKILL, "the run ended before it was killed"
    assert latest_checkpoint(run_dir / "checkpoints").name in ("step_0000006", "step_0000009")
    assert not (run_dir / "summary.json").exists()
    resumed = run_to_end(command, run_dir)
    assert resumed["train_losses"] == uninterrupted["train_losses"]
    assert resumed["val_losses"] == uninterrupted["val_losses"]


def test_sigkill_mid_save_leaves_the_previous_checkpoint_and_resume_matches(uninterrupted, data_cache, tmp_path):
    run_dir, driver = tmp_path / "run", tmp_path / "kill_during_save.py"
    driver.write_text(KILL_DURING_SAVE.format(step=6, launcher=str(REPO / "launch/pretrain.py")))
    command = launch_command(run_dir, data_cache)
    killed = subprocess.run([sys.executable, str(driver)] + command[1:], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    half_written = checkpoints / ".step_0000006.tmp" / "state.pt"
    assert half_written.is_file() and half_written.stat().st_size > 0
    assert latest_checkpoint(checkpoints).name == "step_0000003"
    assert not nan_tensors(load_checkpoint(latest_checkpoint(checkpoints)))
    resumed = run_to_end(command, run_dir)
    assert resumed["train_losses"] == uninterrupted["train_losses"]
    assert resumed["val_losses"] == uninterrupted["val_losses"]
    assert not half_written.parent.exists()


@pytest.mark.parametrize("settings, message", [
    (["checkpoint.load=nowhere"], "error: no checkpoint at"),
    (["model.attention=flash"], "error: model.attention='flash' needs the flash-attn package"),  # at the first forward
    (["train.adamw=apex"], "error: train.adamw='apex' needs NVIDIA apex"),  # when the optimizer is built
    (["data.corpus=null", "data.train_prefix=nowhere", "data.valid_prefix=nowhere_else"],
     "error: indexed dataset file missing: "),  # the path made absolute
    (["train.lr=1e30", "train.warmup_steps=1", "train.max_consecutive_skips=1"],
     "error: 1 steps in a row (up to step 2) had a non-finite loss or gradient norm"),
], ids=["checkpoint", "kernel", "optimizer", "data", "non_finite"])
def test_launcher_reports_run_errors_in_one_line(settings, message, data_cache, tmp_path):
    """A missing checkpoint or data file, a kernel choice this CPU machine cannot run, a run that
    diverged: one line, no traceback. (The deepspeed launcher's --local_rank is accepted.)"""
    command = launch_command(tmp_path / "run", data_cache) + ["--local_rank=0"]
    command += [a for setting in settings for a in ("--set", setting)]
    done = subprocess.run([sys.executable] + command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().startswith(message) and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert not (tmp_path / "run").exists() or any((tmp_path / "run").iterdir())  # no empty run directory left
    if "checkpoint.load=nowhere" in settings or "data.train_prefix=nowhere" in settings:
        assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_second_job_in_a_run_directory_is_refused_while_the_first_trains(saved_run, tiny_config, data_cache):
    """Two jobs in one run directory (a duplicate submission, a requeue while the first still ran) both trained,
    the second overwriting the first's checkpoints and summary.json unannounced. The first holds it now; the
    second is refused before it writes anything, by the library and by the launcher; once the first is done
    (or killed: the kernel drops its lock) the directory is free again."""
    from megatron_unipool.training.checkpoint import hold_run_directory
    run, files = saved_run
    resumed = tiny_config(UNIPOOL, "train.max_steps=3", "train.eval_interval=0")
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    with hold_run_directory(run):
        files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}  # the lock file included
        refusal = f"run directory {run} is in use by another job ({holder}), whose checkpoints and summary"
        with pytest.raises(CheckpointError, match="^" + re.escape(refusal)):
            Trainer(resumed, run)  # before it builds the data and the model
        done = subprocess.run([sys.executable] + launch_command(run, data_cache), capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 1 and done.stderr.startswith(f"error: {refusal}"), done.stderr[-1500:]
        assert unchanged(run, files)
    started = Trainer(resumed, run)  # set up before the other job took the directory: refused when it trains
    with hold_run_directory(run):
        with pytest.raises(CheckpointError, match="^" + re.escape(refusal)):
            started.train()
    assert Trainer(resumed, run).train()["steps"] == 3  # released: the run continues


def test_launcher_refuses_a_run_directory_it_cannot_use_and_says_config_errors_once(data_cache, tmp_path):
    (tmp_path / "a_file").write_text("")
    command = launch_command(tmp_path / "a_file", data_cache)
    done = subprocess.run([sys.executable] + command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert done.stderr.strip() == f"error: run directory {tmp_path / 'a_file'} cannot be used: it is a file"
    # a config error reaches every rank of a launcher: rank 0 says it, the others stay silent
    typo = launch_command(tmp_path / "run", data_cache) + ["--set", "train.max_step=3"]
    said = [subprocess.run([sys.executable] + typo, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank % 2), WORLD_SIZE="4"))
            for rank in (0, 1, 2)]
    assert [s.returncode for s in said] == [2, 2, 2]
    assert said[0].stderr.startswith("error: invalid config:\n  unknown key train.max_step") and said[1].stderr == ""
    # the first rank of another node says it too (a file only some nodes see fails there alone)
    assert said[2].stderr.startswith("rank 2: error: invalid config:\n  unknown key train.max_step")


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0, RANK=0, LOCAL_RANK=0: a job needs WORLD_SIZE >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "WORLD_SIZE=2, RANK=5, LOCAL_RANK=0: a job needs WORLD_SIZE >= 1, 0 <= RANK <"),
])
def test_a_malformed_job_environment_is_refused_at_once(env, message, data_cache, tmp_path):
    """Not a ValueError traceback, nor a rank outside the job waiting parallel.timeout_s for the others."""
    bare = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    command = [sys.executable] + launch_command(tmp_path / "run", data_cache)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(bare, OMP_NUM_THREADS="1", **env),
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: " + message), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_a_job_environment_the_launcher_did_not_finish_is_one_line(data_cache, tmp_path):
    """WORLD_SIZE without the rest (a hand-written job script): DeepSpeed would look for MPI instead and fail
    in a traceback about mpi4py, or with it make each rank a job of its own. A master port another process
    holds is said as such, not as ranks that failed to join."""
    bare = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable] + launch_command(tmp_path / "run", data_cache)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(bare, OMP_NUM_THREADS="1", WORLD_SIZE="2", RANK="1", LOCAL_RANK="0"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == ("rank 1: error: WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT are not set: start the job with the"
                           " deepspeed launcher or torchrun, or set RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for every"
                           " process (LOCAL_RANK: its rank within its node)\n")
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(command + ["--set", "parallel.timeout_s=30"], capture_output=True, text=True, timeout=300,
                              env=dict(bare, OMP_NUM_THREADS="1", WORLD_SIZE="2", RANK="0", LOCAL_RANK="0",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith(f"error: MASTER_PORT {port} on 127.0.0.1 is in use by another process: start the job"
                                  " with another port"), done.stderr[-2000:]


@pytest.mark.parametrize("sig, sets", [(signal.SIGINT, []), (signal.SIGTERM, ["checkpoint.save_on_sigterm=false"])],
                         ids=["ctrl-c", "sigterm-at-once"])
def test_ctrl_c_ends_the_run_with_one_line_and_it_resumes(sig, sets, data_cache, tmp_path):
    """Ctrl-C, or SIGTERM when the config says it interrupts at once too: the run keeps its last checkpoint."""
    sets = [a for s in sets for a in ("--set", s)]
    run_dir = tmp_path / "run"
    command = launch_command(run_dir, data_cache) + sets
    status, stderr = signalled(command, "step  4/12", sig)  # after the step-3 checkpoint
    assert status == 128 + sig, stderr[-2000:]
    assert stderr.strip() == f"interrupted; run again to resume from {run_dir / 'checkpoints' / 'step_0000003'}"
    started_from = tmp_path / "started_from"  # checkpoint.load's, until the run has a checkpoint of its own
    status, stderr = signalled(launch_command(started_from, data_cache) + sets + ["--set", f"checkpoint.load={run_dir}"],
                               "step  5/12", sig)
    assert status == 128 + sig and stderr.strip() == f"interrupted; run again to resume from {run_dir / 'checkpoints' / 'step_0000003'}"
    assert run_to_end(command, run_dir)["steps"] == 12
    fresh = tmp_path / "fresh"  # interrupted before its first checkpoint: nothing to promise
    status, stderr = signalled(launch_command(fresh, data_cache) + sets, "step  2/12", sig)
    assert status == 128 + sig and stderr.strip() == ("interrupted; no checkpoint to resume from (none written yet, or"
                                                " checkpoint.resume is false)"), stderr[-2000:]


def test_sigterm_saves_at_the_end_of_the_step_and_the_rerun_gives_the_uninterrupted_losses(uninterrupted, data_cache,
                                                                                            tmp_path):
    """A scheduler's preemption: the step under way ends, is saved (between two scheduled saves) and the run
    stops with one line; nothing trained is lost."""
    run_dir = tmp_path / "run"
    command = launch_command(run_dir, data_cache)
    status, stderr = signalled(command, "step  4/12", signal.SIGTERM)  # after the step-3 checkpoint
    stopped = re.fullmatch(r"stopped by SIGTERM at the end of step (\d+); run again to resume from (.+)", stderr.strip())
    assert status == 143 and stopped, stderr[-2000:]
    step = int(stopped[1])
    assert 4 <= step < 12 and Path(stopped[2]) == latest_checkpoint(run_dir / "checkpoints") == \
        run_dir / "checkpoints" / f"step_{step:07d}"
    resumed = run_to_end(command, run_dir)
    assert resumed["train_losses"] == uninterrupted["train_losses"]
    assert resumed["val_losses"] == uninterrupted["val_losses"]
    fresh = tmp_path / "fresh"  # a rerun would start over: the line must not promise a resume
    status, stderr = signalled(launch_command(fresh, data_cache) + ["--set", "checkpoint.resume=false"], "step  2/12",
                               signal.SIGTERM)
    assert status == 143 and re.fullmatch(r"stopped by SIGTERM at the end of step \d+; saved .*step_\d+, but"
                                          r" checkpoint.resume is false: continue from it with checkpoint.load",
                                          stderr.strip()), stderr[-2000:]


def test_sigterm_while_the_job_is_set_up_interrupts_at_once_and_during_training_only_asks_to_stop():
    """Before the trainer runs there is nothing to save: SIGTERM interrupts. While it trains, SIGTERM only
    asks to stop (unless checkpoint.save_on_sigterm is false); Ctrl-C still interrupts."""
    from script_modules import load_script

    launcher = load_script(REPO / "launch" / "pretrain.py")
    setting_up = launcher.Interruption()
    with pytest.raises(KeyboardInterrupt), setting_up.interruptible():
        setting_up(signal.SIGTERM, None)
    assert not setting_up.stop_requested()
    training = launcher.Interruption()
    with pytest.raises(KeyboardInterrupt), training.interruptible(sigterm_stops_at_step_end=True):
        training(signal.SIGTERM, None)
        training(signal.SIGTERM, None)  # a launcher's second SIGTERM
        assert training.stop_requested()
        training(signal.SIGINT, None)
    training(signal.SIGINT, None)  # while the run reports: only noted


def test_ctrl_c_inside_a_checkpoint_write_ends_with_the_one_line(data_cache, tmp_path, monkeypatch, capsys):
    """torch.save's zip writer, interrupted mid-write, raises a RuntimeError of its own in place of the
    KeyboardInterrupt: the run still ends as interrupted (one line, 130), not with a traceback."""
    from script_modules import load_script

    launcher = load_script(REPO / "launch" / "pretrain.py")

    def train_interrupted_while_saving(config, run_dir, interruption):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 105293440 vs 105293332")

    monkeypatch.setattr(launcher, "train", train_interrupted_while_saving)
    # main installs its signal handlers: put pytest's back afterwards
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = launcher.main(["--run-dir", str(tmp_path / "run"), "--set", f"data.cache_dir={data_cache}"])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert status == 130
    assert capsys.readouterr().err.strip() == ("interrupted; no checkpoint to resume from (none written yet, or"
                                               " checkpoint.resume is false)")
    assert not launcher.raised_while_interrupted(RuntimeError("a bug of ours"))


def test_a_signal_while_the_config_loads_ends_with_the_one_line(data_cache, tmp_path, monkeypatch, capsys):
    """SIGTERM between main's handlers and the job's first interruptible part (the config loading) was a
    KeyboardInterrupt traceback, exit 130: it is noted, and the job ends as it starts, 143, leaving no run
    directory."""
    from script_modules import load_script

    launcher = load_script(REPO / "launch" / "pretrain.py")
    real_load_config = launcher.load_config

    def terminated_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_load_config(*args, **kwargs)

    monkeypatch.setattr(launcher, "load_config", terminated_while_loading)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = launcher.main(["--run-dir", str(tmp_path / "run"), "--set", f"data.cache_dir={data_cache}"])
    except KeyboardInterrupt:  # what it was: not pytest's own interruption of the session
        pytest.fail("the signal escaped main as a KeyboardInterrupt")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert status == 143
    assert capsys.readouterr().err.strip() == "interrupted while the job started; nothing was trained"
    assert not (tmp_path / "run").exists()


def test_default_run_directory_is_a_run_directorys_own_only_for_its_config_json(tmp_path):
    from script_modules import load_script

    launcher = load_script(REPO / "launch" / "pretrain.py")
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    assert launcher.default_run_dir(tmp_path / "out" / "config.json") == tmp_path / "out"  # written by the tools
    assert launcher.default_run_dir(tmp_path / "out" / "mine.json") == Path("runs") / "mine"
    assert launcher.default_run_dir(tmp_path / "config.json") == Path("runs") / "config"  # no checkpoints/ beside it


@pytest.mark.parametrize("blocked, kind", [("checkpoints", "file"), ("tensorboard", "file"),
                                           ("summary.json", "directory"), ("checkpoints/latest", "directory")])
def test_something_in_the_way_of_the_run_directory_outputs_is_refused_before_training(blocked, kind, tiny_config,
                                                                                      tmp_path):
    run = tmp_path / "run"
    (run / blocked).parent.mkdir(parents=True, exist_ok=True)
    (run / blocked).mkdir() if kind == "directory" else (run / blocked).write_text("")
    must_be = "a file" if kind == "directory" else "a directory"
    with pytest.raises(CheckpointError, match=rf"run directory \S+run: {blocked} must be {must_be}; move away"):
        Trainer(tiny_config(UNIPOOL, "train.max_steps=2"), run)


def test_a_save_that_cannot_prune_says_the_checkpoint_was_written_and_a_linked_step_is_unlinked(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, 1, {"w": torch.zeros(1)}, keep_last=1)
    (directory / "step_0000001").rename(tmp_path / "kept")
    (directory / "step_0000001").symlink_to(tmp_path / "kept")  # e.g. moved to another disk and linked back
    save_checkpoint(directory, 2, {"w": torch.zeros(1)}, keep_last=1)
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step_0000002"] and (tmp_path / "kept").is_dir()
    (directory / "step_0000001").mkdir()
    (directory / "step_0000001" / "locked").mkdir()
    real_rmtree = shutil.rmtree

    def refuses(path, *args, **kwargs):
        if Path(path).name == "step_0000001":
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refuses)
    with pytest.raises(CheckpointError, match=r"wrote \S+step_0000003 \(now latest\), but could not remove older"
                                              r" checkpoints: Permission denied"):
        save_checkpoint(directory, 3, {"w": torch.zeros(1)}, keep_last=1)
    assert latest_checkpoint(directory).name == "step_0000003"


def test_a_checkpoint_that_cannot_be_written_is_one_checkpoint_error(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(CheckpointError, match=r"cannot write the step 3 checkpoint in \S+taken/checkpoints: "):
        save_checkpoint(tmp_path / "taken" / "checkpoints", 3, {"w": torch.zeros(1)}, keep_last=1)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux's /proc/meminfo to compare with")
def test_available_host_memory_is_what_linux_reports_available():
    from megatron_unipool.training.hardware import available_host_memory

    with open("/proc/meminfo") as meminfo:
        reported = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    assert abs(available_host_memory() - reported) < 2**28  # read a moment apart: within 256 MiB


def test_a_model_the_host_cannot_hold_is_refused_before_it_is_built(tiny_config, tmp_path, monkeypatch):
    """Sizes typed wrong (a pool of 10^9 experts) ended in the allocator's traceback or the OOM killer."""
    from megatron_unipool.config import ConfigError
    from megatron_unipool.model import param_budget
    from megatron_unipool.training import hardware

    config = tiny_config(UNIPOOL, "train.max_steps=1")
    params = param_budget(config.model, config.moe).total_params
    monkeypatch.setattr(hardware, "available_host_memory", lambda: 4 * params - 1)
    with pytest.raises(ConfigError, match=rf"^the model holds {params:,} parameters .* GiB in fp32 in all: more than"):
        Trainer(config, tmp_path / "run")
    monkeypatch.setattr(hardware, "available_host_memory", lambda: 4 * params)
    Trainer(config, tmp_path / "run")  # exactly enough
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's: two processes of this host build it
    with pytest.raises(ConfigError, match=r"parameters, on each of the 2 processes of this host, .* GiB in fp32 in all"):
        Trainer(config, tmp_path / "run")


def test_a_layer_count_no_model_has_is_refused_by_the_config_check(tiny_config):
    from megatron_unipool.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.num_layers: 1000000000 must be <= 10000"):
        tiny_config(UNIPOOL, "model.num_layers=1000000000")


def test_a_resume_with_another_sequence_length_or_initialisation_names_no_model_setting(saved_run, tiny_config,
                                                                                        tmp_path, capsys):
    """seq_len has a note of its own, and init_std only drew the weights the checkpoint replaces: neither is
    listed among the changed model settings."""
    run, files = saved_run
    capsys.readouterr()
    Trainer(tiny_config(UNIPOOL, "model.seq_len=32", "model.init_std=0.05", f"checkpoint.load={run}"),
            tmp_path / "other")
    out = capsys.readouterr().out
    assert "note: model.seq_len=32, the checkpoint's run had 64" in out
    assert "resumed with settings" not in out


def test_settings_an_older_checkpoint_lacks_are_not_compared(tiny_config):
    """A checkpoint written before a setting existed has no value for it: nothing to compare, no KeyError."""
    config = tiny_config(UNIPOOL)
    saved = config_to_dict(config)
    for section, key in (("model", "num_kv_heads"), ("model", "rope_base"), ("moe", "top_k")):
        del saved[section][key]
    check_same_head_split(saved, config, "old")
    assert changed_settings(saved, config) == {}
    saved["moe"]["aux_loss_coeff"] = 0.5
    assert changed_settings(saved, config) == {"moe.aux_loss_coeff": (0.5, config.moe.aux_loss_coeff)}


def test_a_dense_models_moe_settings_are_not_named(tiny_config):
    """A model dense in both runs has no experts: its moe section computes nothing, so a difference there is
    not a changed setting (a UniPool's is)."""
    dense = tiny_config("configs/tiny_dense_cpu.json")
    saved = config_to_dict(dense)
    saved["moe"]["top_k"] = dense.moe.top_k + 1
    assert changed_settings(saved, dense) == {}
    unipool = tiny_config(UNIPOOL)
    saved = config_to_dict(unipool)
    saved["moe"]["top_k"] = unipool.moe.top_k + 1
    assert changed_settings(saved, unipool) == {"moe.top_k": (unipool.moe.top_k + 1, unipool.moe.top_k)}


def test_unset_settings_that_are_not_derived_are_named_when_set_on_resume(tiny_config):
    """capacity_factor unset is dropless and norm_router_c unset is c(M, k): setting either changes what the model
    computes with the same tensors. A micro-batch size changes capacity and the per-layer aux loss."""
    config = tiny_config(UNIPOOL, "moe.capacity_factor=0.5", "moe.norm_router_c=3.0", "train.micro_batch=2")
    saved = config_to_dict(tiny_config(UNIPOOL))
    assert changed_settings(saved, config) == {"moe.norm_router_c": (None, 3.0), "moe.capacity_factor": (None, 0.5),
                                               "train.micro_batch": (4, 2)}
    saved = config_to_dict(tiny_config(UNIPOOL))
    assert changed_settings(saved, tiny_config(UNIPOOL, "train.micro_batch=2", "moe.pool_size=32")) == {}
    for per_micro_batch in ("moe.aux_loss=layer", "moe.pool_aux_lag=micro_batch", "moe.lock_entropy_coeff=0.1"):
        saved = config_to_dict(tiny_config(UNIPOOL, per_micro_batch))
        assert changed_settings(saved, tiny_config(UNIPOOL, per_micro_batch, "train.micro_batch=2")) == {
            "train.micro_batch": (4, 2)}, per_micro_batch


def test_a_resume_switches_unipool_lock_on_before_its_window_and_off_before_it_assigned(saved_run, tiny_config,
                                                                                         tmp_path, capsys):
    """The lock's buffers are run state: a 2-step run without them resumes under a lock whose window opens after
    step 2 (they start as the model's own), and a lock that has not assigned the experts may be dropped; any
    other difference is one line naming the lock, not its buffers."""
    from megatron_unipool.model import LanguageModel
    from megatron_unipool.training.checkpoint import adopt_lock_change, restore_model

    run, files = saved_run
    capsys.readouterr()
    locked = Trainer(tiny_config(UNIPOOL, "moe.lock_start_step=10", "moe.lock_window_steps=8", f"checkpoint.load={run}"),
                     tmp_path / "locked")
    assert "moe.lock_start_step=10 (was None)" in capsys.readouterr().out
    fresh = LanguageModel(locked.config.model, locked.config.moe).state_dict()
    lock_state = {k: v for k, v in locked.model.state_dict().items() if k.startswith("pool_locks.")}
    assert lock_state and all(torch.equal(v, fresh[k]) for k, v in lock_state.items())
    with pytest.raises(CheckpointError) as error:  # its window opened at step 1: two steps of mass are missing
        Trainer(tiny_config(UNIPOOL, "moe.lock_start_step=10", "moe.lock_window_steps=10", f"checkpoint.load={run}"),
                tmp_path / "late")
    assert "the UniPool-lock state (pool_locks.*)" in str(error.value) and "missing" not in str(error.value)
    assert unchanged(run, files)

    state = locked.model.state_dict()
    unlocked = LanguageModel(tiny_config(UNIPOOL).model, tiny_config(UNIPOOL).moe)
    restore_model(unlocked, adopt_lock_change(unlocked, state, 5), "unassigned")  # mass only: no logit offset yet
    assigned = {**state, **{k: torch.zeros_like(v) for k, v in state.items() if k.endswith(".owner")}}
    with pytest.raises(CheckpointError, match=r"does not fit this model:\n  the UniPool-lock state"):
        restore_model(unlocked, adopt_lock_change(unlocked, assigned, 5), "assigned")


def test_a_resume_onto_data_another_tokenizer_wrote_is_noted(tiny_config, tmp_path, capsys):
    """The same prefixes tokenised again by another tokenizer of the same size: the index names it, the
    checkpoint keeps the name its run trained on."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 255, 400).tolist() for _ in range(4)]

    def tokenised_by(name: str) -> list[str]:
        return [f"data.train_prefix={write(tmp_path / 'train', documents, 256, 255, name)}",
                f"data.valid_prefix={write(tmp_path / 'valid', documents[:2], 256, 255, name)}"]

    def run(max_steps: int, name: str) -> str:
        Trainer(tiny_config(UNIPOOL, "data.corpus=null", "train.eval_interval=0", f"train.max_steps={max_steps}",
                            *tokenised_by(name)), tmp_path / "run").train()
        return capsys.readouterr().out

    assert "tokenizer" not in run(1, "first")
    assert ("note: the training data was written by tokenizer second, the checkpoint's run's by first: its token ids"
            " mean other text than the ones the model learned") in run(2, "second")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000002")["train_state"]["tokenizer"] == "second"
    assert "tokenizer" not in run(3, "second")


def test_a_resume_onto_rewritten_training_files_is_noted(tiny_config, tmp_path, capsys):
    """Training files preprocessed again in place (other documents, the same tokenizer): the run reads on from the
    checkpoint's sample count in other data, so the resume says so; the same contents elsewhere, or read at another
    sample length, are the same data."""
    rng = np.random.default_rng(0)
    documents = [[rng.integers(0, 255, 400).tolist() for _ in range(4)] for _ in range(3)]
    train, valid = write(tmp_path / "train", documents[0], 256, 255), write(tmp_path / "valid", documents[0][:2], 256, 255)

    def run(max_steps: int, train_prefix: str, *overrides: str) -> str:
        Trainer(tiny_config(UNIPOOL, "data.corpus=null", "train.eval_interval=0", f"train.max_steps={max_steps}",
                            f"data.train_prefix={train_prefix}", f"data.valid_prefix={valid}", *overrides),
                tmp_path / "run").train()
        return capsys.readouterr().out

    assert "by content hash" not in run(1, train)
    before = IndexedDataset(train).content_hash()
    moved = tmp_path / "moved" / "train"
    moved.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(tmp_path / f"train{suffix}", moved.with_suffix(suffix))
    out = run(2, str(moved))  # the same contents elsewhere: a changed prefix, not other data
    assert f"data.train_prefix={str(moved)!r} (was {train!r})" in out and "by content hash" not in out
    write(tmp_path / "train", documents[1], 256, 255)  # preprocessed again, over the files the run trained on
    after = IndexedDataset(train).content_hash()
    assert after != before
    assert (f"note: {train} holds other data than the checkpoint's run read (by content hash): the run reads the"
            " training files from sample 16 on, where the checkpoint's data stopped, not from their start") in run(3, train)
    out = run(4, train, "model.seq_len=32")  # its own note, for samples of another length in the same data
    assert "model.seq_len=32, the checkpoint's run had 64" in out and "by content hash" not in out
    # in a blend, the note names the file that changed
    other = write(tmp_path / "other", documents[0], 256, 255)
    blend = f"data.train_prefix={json.dumps({train: 1, other: 1})}"
    Trainer(tiny_config(UNIPOOL, "data.corpus=null", "train.eval_interval=0", "train.max_steps=1", blend,
                        f"data.valid_prefix={valid}"), tmp_path / "blend").train()
    write(tmp_path / "other", documents[2], 256, 255)
    Trainer(tiny_config(UNIPOOL, "data.corpus=null", "train.eval_interval=0", "train.max_steps=2", blend,
                        f"data.valid_prefix={valid}"), tmp_path / "blend").train()
    out = capsys.readouterr().out
    assert f"note: {other} holds other data than the checkpoint's run read" in out and f"{train}," not in out


def test_resuming_at_max_steps_after_an_earlier_evaluation_evaluates_the_checkpoints_step(tiny_config, tmp_path):
    """A checkpoint whose last evaluation is of an earlier step (eval at 2, saved at 3), resumed with
    max_steps=3: nothing trains, and the final validation loss is of the step-3 model, not step 2's."""
    run = ["train.eval_interval=2", "checkpoint.save_interval=3"]
    Trainer(tiny_config(UNIPOOL, "train.max_steps=4", *run), tmp_path / "run").train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000003"
    assert [step for step, _ in load_checkpoint(checkpoint)["train_state"]["val_losses"]] == [2]
    trainer = Trainer(tiny_config(UNIPOOL, "train.max_steps=3", *run, f"checkpoint.load={checkpoint}"),
                      tmp_path / "resumed")
    summary = trainer.train()
    assert [step for step, _ in summary["val_losses"]] == [2, 3]
    assert summary["final_val_loss"] == pytest.approx(trainer.evaluate().loss, rel=1e-6)


def test_a_resume_that_ties_an_untied_checkpoints_embeddings_is_refused(tiny_config, tmp_path):
    """An untied checkpoint's tensors all fit a model.tie_embeddings=true model (both names, same shapes), but
    loading would keep one of the two matrices for both: restore_model refuses it instead of resuming as
    another function."""
    base = ["train.max_steps=1", "train.eval_interval=0"]
    Trainer(tiny_config("configs/tiny_dense_cpu.json", *base), tmp_path / "untied").train()
    with pytest.raises(CheckpointError, match="output.weight differs from embedding.weight"):
        Trainer(tiny_config("configs/tiny_dense_cpu.json", *base, "model.tie_embeddings=true",
                            f"checkpoint.load={tmp_path / 'untied'}"), tmp_path / "tied")


def test_a_derived_setting_left_unset_on_resume_is_not_named(tiny_config):
    """pool_size set to the full pool in the checkpoint's run and left unset (derived: the same pool) now:
    no change to name, in either direction."""
    import dataclasses

    unset = tiny_config(UNIPOOL)
    full = unset.moe.experts_per_pool(unset.model.num_layers)
    explicit = dataclasses.replace(unset, moe=dataclasses.replace(unset.moe, pool_size=full))
    assert changed_settings(config_to_dict(explicit), unset) == {}
    assert changed_settings(config_to_dict(unset), explicit) == {}
