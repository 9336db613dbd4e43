"""Checkpoint cells the layout tests leave out, (save layout, backend) -> (load layout, backend): each resumed run
continues the single-process one, or its state is loaded and written again exactly."""
from __future__ import annotations

import pytest
import torch

from megatron_unipool.training import Trainer, load_checkpoint
from parallel_harness import job_config, run_job, run_on_ranks, run_parallel
from test_parallel import LAYOUTS, STEPS, VARIANTS, ZERO, assert_same_run, reference  # noqa: F401 (fixture)

BASE = [f"train.max_steps={STEPS}"] + VARIANTS["unipool"]


def _step2(run_dir):
    return run_dir / "checkpoints" / "step_0000002"


@pytest.mark.slow
def test_cells_the_layout_tests_miss_continue_the_single_process_run(reference, data_cache, tmp_path):
    """world 1 -> tp2, ep2 -> world 1, dp2 ZeRO-1 <-> built-in at world 1, tp2 -> pp2."""
    run_job(job_config("unipool", BASE + ["checkpoint.save_interval=2"], data_cache, 1), tmp_path / "w1")
    load = lambda run: [f"checkpoint.load={_step2(tmp_path / run)}"]
    results = run_parallel(2, [
        ("tp2_from_w1", "unipool", BASE + LAYOUTS["tp2"][1] + load("w1")),
        ("dp2z1_from_w1", "unipool", BASE + ZERO["zero1"] + load("w1")),
        ("ep2", "unipool", BASE + LAYOUTS["ep2"][1] + ["checkpoint.save_interval=2"]),
        ("dp2z1", "unipool", BASE + ZERO["zero1"] + ["checkpoint.save_interval=2"]),
        ("tp2", "unipool", BASE + LAYOUTS["tp2"][1] + ["checkpoint.save_interval=2"]),
        ("pp2_from_tp2", "unipool", BASE + LAYOUTS["pp2"][1] + load("tp2")),
    ], data_cache, tmp_path)
    for name in ("tp2_from_w1", "dp2z1_from_w1", "pp2_from_tp2"):
        assert_same_run(results[name], reference("unipool"), name)
    for source in ("ep2", "dp2z1"):
        resumed = run_job(job_config("unipool", BASE + load(source), data_cache, 1), tmp_path / f"w1_from_{source}")
        assert_same_run(dict(resumed, pool_replica_gap=0.0, world_size=1), reference("unipool"), f"{source} -> world 1")


def _load_and_save(rank, world):
    import json
    import os
    from pathlib import Path

    from megatron_unipool.training import init_parallel
    config = job_config("unipool", json.loads(os.environ["PORTABILITY_OVERRIDES"]), os.environ["PORTABILITY_DATA"], world)
    trainer = Trainer(config, Path(os.environ["PORTABILITY_RUN"]), device=torch.device("cpu"), parallel=init_parallel(config))
    return str(trainer.save())


@pytest.mark.slow
@pytest.mark.parametrize("world, overrides", [(1, ZERO["zero1"]), (4, ["parallel.ep=4"] + ZERO["zero1"]), (1, [])])
def test_zero2_bf16_state_loads_exactly_under_zero1_at_another_dp_and_the_built_in_optimizer(world, overrides, data_cache,
                                                                                             tmp_path, monkeypatch):
    """Saved under ZeRO-2 bf16 at ep2, loaded at another dp and backend, saved again: every master weight, moment,
    step and buffer (router bias, f_bar) and the train state are what was saved."""
    import json
    bf16 = BASE + ["train.precision=bf16"]
    run_parallel(2, [("z2", "unipool", bf16 + LAYOUTS["ep2"][1] + ZERO["zero2"] + ["checkpoint.save_interval=2"])],
                 data_cache, tmp_path)
    source = _step2(tmp_path / "z2")
    monkeypatch.setenv("PORTABILITY_OVERRIDES", json.dumps(bf16 + overrides + [f"checkpoint.load={source}"]))
    monkeypatch.setenv("PORTABILITY_DATA", data_cache)
    monkeypatch.setenv("PORTABILITY_RUN", str(tmp_path / "again"))
    written = load_checkpoint(run_on_ranks(world, _load_and_save, tmp_path / "ranks")[0])
    saved = load_checkpoint(source)
    assert saved["model"].keys() == written["model"].keys()
    for name, tensor in saved["model"].items():
        assert tensor.dtype == written["model"][name].dtype and torch.equal(tensor, written["model"][name]), name
    for name, state in saved["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value).float(), torch.as_tensor(written["optimizer"][name][key]).float()), \
                f"{name}::{key}"
    assert {k: v for k, v in saved["train_state"].items() if k != "resumed_at_steps"} == \
        {k: v for k, v in written["train_state"].items() if k != "resumed_at_steps"}
