"""Training runs on the default corpus: learning, exact resume, layout-invariant accumulation,
what a run writes, and the errors a user sees for data that does not fit the model."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_unipool.data import IndexedDataset, IndexedDatasetWriter, TokenSampleDataset, prepare_default_corpus
from megatron_unipool.training import DataError, Trainer, latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def unigram_entropy(prefix: str) -> float:
    dataset = IndexedDataset(prefix)
    counts = np.bincount(np.asarray(dataset.tokens(0, dataset.num_tokens)), minlength=dataset.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("kind", ["dense", "vanilla", "unipool"])
def test_loss_falls_well_below_unigram_entropy(kind, tiny_config, data_cache, tmp_path):
    config = tiny_config(f"configs/tiny_{kind}_cpu.json", "train.max_steps=200", "train.eval_interval=0",
                         "train.warmup_steps=10")
    summary = Trainer(config, tmp_path).train()
    entropy = unigram_entropy(prepare_default_corpus("byte", data_cache)[0])
    assert summary["final_val_loss"] < entropy - 0.5, (summary["final_val_loss"], entropy)
    assert np.mean(summary["train_losses"][-10:]) < entropy - 0.5


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_config, tmp_path):
    overrides = ["train.max_steps=6", "checkpoint.save_interval=3", "train.eval_interval=3", "moe.bias_balancing=true"]
    full = Trainer(tiny_config("configs/tiny_unipool_cpu.json", *overrides), tmp_path / "full").train()
    midway = tmp_path / "full" / "checkpoints" / "step_0000003"
    assert midway.is_dir() and latest_checkpoint(tmp_path / "full" / "checkpoints").name == "step_0000006"
    trainer = Trainer(tiny_config("configs/tiny_unipool_cpu.json", *overrides, f"checkpoint.load={midway}"),
                      tmp_path / "resumed")
    resumed = trainer.train()
    assert resumed["train_losses"] == full["train_losses"]
    assert resumed["val_losses"] == full["val_losses"]
    # tokens/s over the run leaves out the warm-up of each session: steps 1 and 4
    rates = trainer.state.tokens_per_second
    assert trainer.state.resumed_at_steps == [4] and len(rates) == 6
    measured = [rates[step - 1] for step in (2, 3, 5, 6)]
    assert resumed["tokens_per_second"] == pytest.approx(4 / sum(1 / rate for rate in measured), rel=1e-12)
    # a second start in a finished run directory resumes at the end and trains nothing more
    again = Trainer(tiny_config("configs/tiny_unipool_cpu.json", *overrides), tmp_path / "full")
    assert again.state.step == 6 and again.state.train_losses == full["train_losses"]


def test_a_finished_run_extended_keeps_its_final_validation(tiny_config, tmp_path):
    """The last checkpoint is saved before the final evaluation, so a run extended from it (train.max_steps
    raised) evaluates that step again: its validation history is the uninterrupted longer run's."""
    overrides = ["train.eval_interval=3", "checkpoint.save_interval=3"]
    full = Trainer(tiny_config("configs/tiny_unipool_cpu.json", *overrides, "train.max_steps=6"), tmp_path / "full").train()
    Trainer(tiny_config("configs/tiny_unipool_cpu.json", *overrides, "train.max_steps=3"), tmp_path / "extended").train()
    extended = Trainer(tiny_config("configs/tiny_unipool_cpu.json", *overrides, "train.max_steps=6"),
                       tmp_path / "extended").train()
    assert extended["val_losses"] == full["val_losses"] and [step for step, _ in full["val_losses"]] == [3, 6]
    assert extended["train_losses"] == full["train_losses"]


def test_a_blend_trains_on_its_files_by_weight_and_resumes_exactly(tiny_config, data_cache, tmp_path, capsys):
    """data.train_prefix as {prefix: weight}: samples are a function of the global index, so a resume (here with
    the blend's entries in the other order: the same weighted files) reads on where the run stopped."""
    corpus_train, corpus_valid = prepare_default_corpus("byte", data_cache)
    shakespeare = IndexedDataset(corpus_train)
    small = str(tmp_path / "small")  # other text of the same tokenizer: the corpus's first tokens reversed
    with IndexedDatasetWriter(small, shakespeare.vocab_size, shakespeare.eod_id, shakespeare.tokenizer) as writer:
        tokens = np.asarray(shakespeare.tokens(0, 20_000))[::-1]
        writer.add_document(tokens[tokens != shakespeare.eod_id])

    def config(blend: dict, *overrides: str):
        return tiny_config("configs/tiny_unipool_cpu.json", "data.corpus=null", f"data.train_prefix={json.dumps(blend)}",
                           f"data.valid_prefix={corpus_valid}", "train.max_steps=6", "checkpoint.save_interval=3",
                           "train.eval_interval=3", *overrides)

    trainer = Trainer(config({small: 1, corpus_train: 3}), tmp_path / "full")
    full = trainer.train()
    printed = capsys.readouterr().out
    train = trainer.data.train
    seed, read = trainer.config.train.seed, 6 * trainer.config.train.global_batch
    assert sorted(train.names) == train.names == sorted([small, corpus_train])
    for g in range(read):  # each global sample is its file's own sample, as one file's run would read it
        source, index = train.locate(g)
        file_samples = TokenSampleDataset(IndexedDataset(train.names[source]), 64, seed)
        np.testing.assert_array_equal(train.sample(g), file_samples.sample(index))
    from_small = train.source_samples(train.names.index(small), read)
    assert abs(from_small - read / 4) <= 1
    assert (f"{small} 25.0% ({len(train.sources[train.names.index(small)]):,} samples, read"
            f" {from_small / len(train.sources[train.names.index(small)]):.2f} times)") in printed
    assert "data: a blend of 2 files over 6 steps: " in printed
    fingerprint = trainer.data.fingerprint()["training split"]
    assert all(IndexedDataset(prefix).content_hash() in fingerprint for prefix in (small, corpus_train))
    midway = tmp_path / "full" / "checkpoints" / "step_0000003"
    resumed = Trainer(config({corpus_train: 3, small: 1}, f"checkpoint.load={midway}"), tmp_path / "resumed").train()
    assert resumed["train_losses"] == full["train_losses"] and resumed["val_losses"] == full["val_losses"]
    assert "settings other than the checkpoint's" not in capsys.readouterr().out


def test_valid_per_file_reports_each_files_loss_and_their_weighted_mean(tiny_config, data_cache, tmp_path, capsys):
    """data.valid_per_file: each validation file's loss is the one a run validating on that file alone computes, the
    blend's is their mean weighted by the blend, and all of them reach the console, TensorBoard, summary.json and a
    resume; a finished run rerun with the setting switched on evaluates its files at the end."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_unipool.training.metrics import distinct_names

    corpus_train, corpus_valid = prepare_default_corpus("byte", data_cache)
    held_out = IndexedDataset(corpus_valid)
    other = str(tmp_path / "other" / "valid")  # other text of the same tokenizer: the split's tokens reversed
    with IndexedDatasetWriter(other, held_out.vocab_size, held_out.eod_id, held_out.tokenizer) as writer:
        tokens = np.asarray(held_out.tokens(0, held_out.num_tokens))[::-1]
        writer.add_document(tokens[tokens != held_out.eod_id])

    def config(valid, *overrides: str):
        return tiny_config("configs/tiny_unipool_cpu.json", "data.corpus=null", f"data.train_prefix={corpus_train}",
                           f"data.valid_prefix={json.dumps(valid)}", "train.max_steps=4", "train.eval_interval=2",
                           "checkpoint.save_interval=2", *overrides)

    blend = {corpus_valid: 3, other: 1}
    full = Trainer(config(blend, "data.valid_per_file=true", "logging.tensorboard=true"), tmp_path / "full").train()
    final = tmp_path / "full" / "checkpoints" / "step_0000004"
    alone = {prefix: Trainer(config(prefix, f"checkpoint.load={final}"), tmp_path / f"alone{i}").evaluate()
             for i, prefix in enumerate(blend)}
    assert alone[corpus_valid].loss != pytest.approx(alone[other].loss, rel=0.01)
    assert full["final_val_loss_by_file"] == {prefix: pytest.approx(alone[prefix].loss, rel=1e-6) for prefix in blend}
    assert alone[corpus_valid].by_file == {}
    assert full["final_val_loss"] == pytest.approx((3 * alone[corpus_valid].loss + alone[other].loss) / 4, rel=1e-6)
    assert [step for step, _ in full["val_losses"]] == [2, 4]
    assert {prefix: [step for step, _ in losses] for prefix, losses in full["val_losses_by_file"].items()} == {
        corpus_valid: [2, 4], other: [2, 4]}
    names = distinct_names(list(blend))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("validation at step 4"))
    assert (f"| {names[other]}: loss {full['final_val_loss_by_file'][other]:.4f}, perplexity"
            f" {math.exp(full['final_val_loss_by_file'][other]):.3f}") in line
    events = EventAccumulator(str(tmp_path / "full" / "tensorboard")).Reload()
    for prefix, name in names.items():
        assert [(e.step, e.value) for e in events.Scalars(f"validation/{name}/loss")] == [
            (step, pytest.approx(loss, rel=1e-6)) for step, loss in full["val_losses_by_file"][prefix]]
    midway = tmp_path / "full" / "checkpoints" / "step_0000002"
    resumed = Trainer(config(blend, "data.valid_per_file=true", f"checkpoint.load={midway}"), tmp_path / "resumed").train()
    assert resumed["val_losses_by_file"] == full["val_losses_by_file"] and resumed["val_losses"] == full["val_losses"]
    off = Trainer(config(blend, f"checkpoint.load={midway}"), tmp_path / "off").train()  # switched off: the files'
    assert off["final_val_loss_by_file"] == {}  # losses stop at step 2, and the last validation is the mixed one
    assert off["val_losses_by_file"] == {prefix: losses[:1] for prefix, losses in full["val_losses_by_file"].items()}
    mixed = Trainer(config(blend), tmp_path / "mixed").train()
    assert mixed["val_losses_by_file"] == {} and mixed["final_val_loss_by_file"] == {}
    capsys.readouterr()
    switched = Trainer(config(blend, "data.valid_per_file=true"), tmp_path / "mixed").train()
    assert "settings other than the checkpoint's" not in capsys.readouterr().out  # evaluation only: no note
    assert switched["final_val_loss_by_file"] == full["final_val_loss_by_file"]
    assert switched["val_losses"] == mixed["val_losses"][:-1] + [full["val_losses"][-1]]
    # a checkpoint saved after its step's evaluation, continued to that step only: evaluated again, in place
    ended = Trainer(config(blend, "data.valid_per_file=true", "train.max_steps=2",
                           f"checkpoint.load={tmp_path / 'mixed' / 'checkpoints' / 'step_0000002'}"), tmp_path / "ended")
    assert ended.state.val_losses == [tuple(mixed["val_losses"][0])]
    assert ended.train()["val_losses"] == full["val_losses"][:1]
    # continued to its step with a file of the blend replaced: the files it evaluates now are the step's, the one it
    # left keeps its loss of that step (the same weights)
    third = str(tmp_path / "third" / "valid")  # the corpus split's tokens in another order
    with IndexedDatasetWriter(third, held_out.vocab_size, held_out.eod_id, held_out.tokenizer) as writer:
        writer.add_document(np.roll(tokens, 1000)[np.roll(tokens, 1000) != held_out.eod_id])
    replaced = Trainer(config({corpus_valid: 3, third: 1}, "data.valid_per_file=true", "train.max_steps=2",
                              f"checkpoint.load={midway}"), tmp_path / "replaced").train()
    assert replaced["val_losses_by_file"][corpus_valid] == full["val_losses_by_file"][corpus_valid][:1]
    assert replaced["val_losses_by_file"][other] == full["val_losses_by_file"][other][:1]
    assert [step for step, _ in replaced["val_losses_by_file"][third]] == [2] and len(replaced["val_losses"]) == 1
    assert replaced["final_val_loss_by_file"].keys() == {corpus_valid, other, third}


@pytest.mark.parametrize("kind", ["unipool", "vanilla"])
def test_gradient_accumulation_does_not_change_the_math(kind, tiny_config, tmp_path):
    """One micro-batch of 8 or two of 4: same global batch, same losses (the step-lagged pool
    statistics and the global-token loss normalisation make the split irrelevant). The per-layer
    Switch loss counts its load per micro-batch, as Megatron's does, so it is off for vanilla."""
    aux = "moe.aux_loss_coeff=0" if kind == "vanilla" else "moe.aux_loss_coeff=0.01"
    runs = [Trainer(tiny_config(f"configs/tiny_{kind}_cpu.json", "train.max_steps=4", "train.eval_interval=0",
                                f"train.micro_batch={micro}", aux), tmp_path / str(micro)).train()
            for micro in (8, 4, 2)]
    for other in runs[1:]:
        np.testing.assert_allclose(other["train_losses"], runs[0]["train_losses"], rtol=1e-6)


def test_micro_batch_lag_publishes_f_bar_between_micro_batches(tiny_config, tmp_path):
    """moe.pool_aux_lag=micro_batch: the trainer closes each micro-batch, so the second one's pool
    loss uses the first one's f_bar (the first step's first micro-batch has none: loss 0)."""
    trainer = Trainer(tiny_config("configs/tiny_unipool_cpu.json", "moe.pool_aux_lag=micro_batch"), tmp_path)
    train = trainer.config.train
    reference = copy.deepcopy(trainer.model)
    aux = []
    for first in range(0, train.global_batch, train.micro_batch):
        with torch.no_grad():
            _, losses = reference(trainer.data.train.batch(first, train.micro_batch)[:, :-1])
        aux.append(losses["aux_loss"].item())
        reference.end_micro_batch()
    assert aux[0] == 0.0 and aux[1] > 0.0
    metrics, _ = trainer.train_step()
    assert metrics["aux_loss"] == pytest.approx(sum(aux) / len(aux), rel=1e-5)


@pytest.mark.parametrize("kind", ["dense", "unipool"])
def test_first_step_loss_and_update_follow_their_formulas(kind, tiny_config, tmp_path):
    """The logged LM loss is the mean token cross-entropy of the whole global batch (two micro-batches
    here), and the scheduled rate reaches the optimizer: Adam's first update is lr * g / (|g| + eps)."""
    trainer = Trainer(tiny_config(f"configs/tiny_{kind}_cpu.json", "train.lr=0.001", "train.warmup_steps=4",
                                  "train.weight_decay=0"), tmp_path)
    tokens = trainer.data.train.batch(0, trainer.config.train.global_batch)
    with torch.no_grad():
        logits, _ = copy.deepcopy(trainer.model)(tokens[:, :-1])
    expected_loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics, _ = trainer.train_step()
    assert metrics["lm_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["lr"] == pytest.approx(0.001 / 4)
    for start, param in zip(before, trainer.model.parameters()):  # .grad: the clipped gradient Adam saw
        expected_update = metrics["lr"] * param.grad / (param.grad.abs() + trainer.config.train.adam_eps)
        torch.testing.assert_close(start - param.detach(), expected_update, rtol=1e-3, atol=1e-8)


def test_gradient_clipping_scales_to_the_limit_and_zero_turns_it_off():
    from megatron_unipool.parallel import ParallelState
    from megatron_unipool.training.distributed import clip_gradients

    model = torch.nn.Linear(4, 3)
    model.weight.grad, model.bias.grad = torch.full((3, 4), 2.0), torch.ones(3)
    assert clip_gradients(model, {}, ParallelState(), 0.0) == pytest.approx(math.sqrt(12 * 4 + 3))
    assert model.weight.grad.eq(2.0).all() and model.bias.grad.eq(1.0).all()  # train.grad_clip=0: unchanged
    clip_gradients(model, {}, ParallelState(), 1.0)
    clipped = torch.cat([model.weight.grad.flatten(), model.bias.grad])
    assert clipped.norm().item() == pytest.approx(1.0, rel=1e-5)
    model.weight.grad.mul_(1.2)  # norm 1.2: just above a limit of 1.1, just below one of 1.3
    before = torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm().item()
    clip_gradients(model, {}, ParallelState(), 1.3)
    assert torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm().item() == pytest.approx(before, rel=1e-6)
    clip_gradients(model, {}, ParallelState(), 1.1)
    assert torch.cat([model.weight.grad.flatten(), model.bias.grad]).norm().item() == pytest.approx(1.1, rel=1e-5)


def test_a_replica_without_canonical_gradients_reduces_its_zero_on_the_model_device(monkeypatch):
    """A data-parallel replica counts no slice of the norm; its zero was made on the CPU, which NCCL cannot
    all-reduce (every multi-GPU run with dp > ep failed in its first step). Meta stands for a GPU here."""
    from megatron_unipool.parallel import Layout, ParallelState
    from megatron_unipool.training.distributed import global_grad_norm

    model = torch.nn.Linear(4, 3, device="meta")
    model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *args, **kwargs: reduced.append(tensor))
    global_grad_norm(model, {}, ParallelState(Layout(dp=2, rank=1)))  # replicated weights: rank 0 counts them
    assert [tensor.device.type for tensor in reduced] == ["meta"]


@pytest.mark.parametrize("fused, capturable, device", [(True, False, "meta"), (False, True, "meta"),
                                                       (False, False, "cpu")])
def test_adam_steps_are_restored_where_torch_keeps_them(fused, capturable, device):
    """Fused and capturable AdamW read `step` on the parameter's device (a host one is not theirs); the
    others on the host, where a device step would cost a sync per tensor (torch.optim.Adam._init_group)."""
    from megatron_unipool.training.backends import adam_step

    step = adam_step(torch.tensor(7.0), {"fused": fused, "capturable": capturable}, torch.empty(2, device="meta"))
    assert step.device.type == device and step.dtype == torch.float32 and step.dim() == 0
    assert adam_step(7, {"fused": False, "capturable": False}, torch.empty(2)).item() == 7.0


def test_learning_rate_warms_up_linearly_then_decays_on_a_cosine():
    from megatron_unipool.config import TrainConfig
    from megatron_unipool.training.optimizer import learning_rate

    train = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, max_steps=12)
    assert [learning_rate(step, train) for step in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # steps 4..11 decay over 8 steps, as Megatron's (step + 1 - warmup) / (max - warmup): lr once, not twice,
    # and min_lr at the last step the run takes (11), not after it
    assert learning_rate(4, train) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 8)))
    assert learning_rate(7, train) == pytest.approx(5.5e-4)  # halfway: the mean of lr and min_lr
    assert learning_rate(11, train) == pytest.approx(1e-4) and learning_rate(20, train) == pytest.approx(1e-4)
    # a run one step longer than its warmup still decays
    assert learning_rate(20, TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20, max_steps=21)) == pytest.approx(1e-4)
    # without warmup the first step is the peak (it was one decay step below, and a 1-step run got min_lr)
    no_warmup = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=3)
    assert [learning_rate(step, no_warmup) for step in range(3)] == pytest.approx([1e-3, 5.5e-4, 1e-4])
    assert learning_rate(0, TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=1)) == pytest.approx(1e-3)


def test_learning_rate_decays_on_a_line_not_at_all_or_after_a_stable_phase():
    from megatron_unipool.config import TrainConfig
    from megatron_unipool.training.optimizer import learning_rate

    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=4, max_steps=12)
    warmup = [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    for decay, cooldown in (("linear", 0), ("constant", 0), ("wsd", 4)):
        train = TrainConfig(**base, lr_decay=decay, lr_cooldown_steps=cooldown)
        assert [learning_rate(step, train) for step in range(4)] == pytest.approx(warmup)
    linear = TrainConfig(**base, lr_decay="linear")  # the cosine's 8 decay steps, on a line
    assert [learning_rate(step, linear) for step in range(4, 12)] == pytest.approx(
        [1e-3 - 9e-4 * (step - 3) / 8 for step in range(4, 12)])
    assert learning_rate(20, linear) == pytest.approx(1e-4)
    constant = TrainConfig(**base, lr_decay="constant")
    assert [learning_rate(step, constant) for step in (4, 11, 50)] == [1e-3] * 3
    # wsd: lr up to the last 4 steps, which fall on a line to min_lr at the last step
    wsd = TrainConfig(**base, lr_decay="wsd", lr_cooldown_steps=4)
    assert [learning_rate(step, wsd) for step in range(3, 12)] == pytest.approx(
        [1e-3] * 5 + [1e-3 - 9e-4 * i / 4 for i in (1, 2, 3, 4)])
    assert learning_rate(30, wsd) == pytest.approx(1e-4)
    # a stable-phase checkpoint extends: the longer run is at lr where the shorter one cooled down
    longer = TrainConfig(**{**base, "max_steps": 20}, lr_decay="wsd", lr_cooldown_steps=4)
    assert [learning_rate(step, longer) for step in (11, 15, 16, 19)] == pytest.approx([1e-3, 1e-3, 7.75e-4, 1e-4])
    no_warmup = TrainConfig(**{**base, "warmup_steps": 0, "max_steps": 3}, lr_decay="wsd", lr_cooldown_steps=3)
    assert [learning_rate(step, no_warmup) for step in range(3)] == pytest.approx([7e-4, 4e-4, 1e-4])
    # the cool-down's other shapes (Megatron's WSD decay styles): the share of lr - min_lr left at progress i / 4
    for shape, left in (("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2), ("minus_sqrt", lambda p: 1 - p ** 0.5)):
        shaped = TrainConfig(**base, lr_decay="wsd", lr_cooldown_steps=4, lr_cooldown_shape=shape)
        assert [learning_rate(step, shaped) for step in range(7, 12)] == pytest.approx(
            [1e-3] + [1e-4 + 9e-4 * left(i / 4) for i in (1, 2, 3, 4)])


def test_cli_run_writes_summary_and_tensorboard(data_cache, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, str(REPO / "launch/pretrain.py"), "--run-dir", str(run_dir), "--set", "train.max_steps=4",
         "--set", f"data.cache_dir={data_cache}", "--set", "logging.log_interval=2", "--set", "train.eval_interval=2",
         "--set", "logging.utilisation_interval=2", "--set", "model.seq_len=32"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "step 2/4" in out.stdout and "lm loss" in out.stdout and "tokens/s" in out.stdout and "ETA" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_train_loss", "final_val_loss", "train_losses", "vocab_size", "total_params",
                "active_params", "tokens_per_second", "steps"):
        assert key in summary
    assert summary["steps"] == 4 and len(summary["train_losses"]) == 4 and summary["vocab_size"] == 320
    assert summary["final_train_loss"] == summary["train_losses"][-1]
    assert out.stdout.strip().splitlines()[-1].startswith(f"done: 4 steps, final train loss {summary['final_train_loss']:.4f}")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert {"train/lm_loss", "train/aux_loss", "train/grad_norm", "train/tokens_per_second", "train/tflops_per_device",
            "validation/loss"} <= set(tags["scalars"])
    assert "train/z_loss" not in tags["scalars"]  # moe.z_loss_coeff is 0: nothing to log
    assert [e.value for e in events.Scalars("train/lm_loss")] == pytest.approx(summary["train_losses"])
    assert "pool0/expert_load" in tags["histograms"] and "pool/utilisation" in tags["images"]


@pytest.mark.parametrize("resumed_at", [2, 0])
def test_tensorboard_of_a_resumed_run_shows_each_step_once(tiny_config, tmp_path, resumed_at):
    """A run that logged steps past its latest checkpoint and then lost them logs them again on
    resume; TensorBoard must purge the first copies instead of drawing both, also when it was
    killed before its first checkpoint (resumed at step 0)."""
    import shutil

    overrides = ["train.max_steps=4", "checkpoint.save_interval=2", "train.eval_interval=2", "logging.tensorboard=true"]
    Trainer(tiny_config("configs/tiny_unipool_cpu.json", *overrides), tmp_path).train()
    if resumed_at:
        (tmp_path / "checkpoints" / "latest").write_text("step_0000002")  # as if killed before step 4's save
    else:
        shutil.rmtree(tmp_path / "checkpoints")  # as if killed before the first save
    resumed = Trainer(tiny_config("configs/tiny_unipool_cpu.json", *overrides), tmp_path)
    assert resumed.state.step == resumed_at
    summary = resumed.train()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "histograms": 0}).Reload()
    assert [e.step for e in events.Scalars("train/lm_loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/lm_loss")] == pytest.approx(summary["train_losses"])
    assert [e.step for e in events.Scalars("validation/loss")] == [2, 4]
    assert [e.step for e in events.Histograms("pool0/expert_load")] == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["unipool", "vanilla"])
def test_tensorboard_heatmap_rows_are_the_moe_layers(kind, tiny_config, tmp_path, monkeypatch):
    """With a dense layer between MoE layers, the heatmap's rows are named by the model layers
    that route (1 and 3), as unrouted/layer<i> and the utilisation tool name them, not 0 and 1."""
    from megatron_unipool.training import metrics

    drawn, draw = [], metrics.utilisation_figure

    def spy(counts_per_pool, title, layers_per_pool):
        drawn.append(layers_per_pool)
        return draw(counts_per_pool, title, layers_per_pool)

    monkeypatch.setattr(metrics, "utilisation_figure", spy)
    config = tiny_config(f"configs/tiny_{kind}_cpu.json", "train.max_steps=1", "train.eval_interval=0",
                         "logging.tensorboard=true", "moe.moe_layer_interval=2")
    Trainer(config, tmp_path).train()
    assert drawn == [[[1, 3]] if kind == "unipool" else [[1], [3]]]


def test_tensorboard_gets_perplexity_and_each_experts_share_of_the_pool(tmp_path):
    """validation/perplexity is exp(loss); pool<p>/expert_load is each expert's share of the pool's
    slots summed over its layers (M values summing to one), and max_over_mean_load its peak."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_unipool.config import LoggingConfig
    from megatron_unipool.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=True), max_steps=2)
    logger.evaluation(1, 2.5)
    counts = torch.tensor([[6, 0, 2], [0, 4, 0]])  # 2 layers x 3 experts: loads 6, 4, 2 of 12
    logger.utilisation(1, [counts], [[0, 1]], image=False)
    logger.utilisation(2, [torch.zeros_like(counts)], [[0, 1]], image=False)  # nothing routed: nothing logged
    logger.close({})
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    assert events.Scalars("validation/perplexity")[0].value == pytest.approx(math.exp(2.5), rel=1e-6)
    load = events.Histograms("pool0/expert_load")[0].histogram_value
    assert (load.num, load.sum, load.max, load.min) == (3, pytest.approx(1.0), pytest.approx(0.5), pytest.approx(1 / 6))
    assert events.Scalars("pool0/max_over_mean_load")[0].value == pytest.approx(6 / 4)
    assert [event.step for event in events.Scalars("pool0/max_over_mean_load")] == [1]
    assert [event.step for event in events.Histograms("pool0/expert_load")] == [1]


def test_weight_decay_reaches_matrices_and_experts_not_norms_or_scales(tiny_config):
    """Decay: every tensor of two or more dimensions (embeddings, projections, routers, the expert
    pools); none: RMSNorm weights and the NormRouter's learnable scale."""
    from megatron_unipool.model import LanguageModel
    from megatron_unipool.training.optimizer import decay_groups

    config = tiny_config("configs/tiny_unipool_cpu.json")
    model = LanguageModel(config.model, config.moe)
    decay, no_decay = ({id(p) for p in group["params"]} for group in decay_groups(model, config.train))
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[i] for i in no_decay} == {name for name, p in model.named_parameters() if p.ndim < 2}
    assert any(name.endswith("router.scale") for name in map(names.get, no_decay))
    assert any("norm" in name for name in map(names.get, no_decay))
    assert any(name.startswith("expert_pools.") for name in map(names.get, decay)) and not decay & no_decay


def test_adamw_steps_follow_the_formula_with_decay_on_matrices_only(tiny_config):
    """Two steps of the optimizer the trainer builds against AdamW written out: the configured betas, eps and
    rate, decoupled decay on matrices and expert tensors, none on norms and the NormRouter's scale."""
    from megatron_unipool.model import LanguageModel
    from megatron_unipool.training import build_optimizer

    full = tiny_config("configs/tiny_unipool_cpu.json", "train.weight_decay=0.1", "train.beta1=0.8",
                       "train.beta2=0.99", "train.adam_eps=1e-6")
    config, model = full.train, LanguageModel(full.model, full.moe)
    params = list(model.parameters())
    optimizer = build_optimizer(model, config)
    lr = 0.01
    for group in optimizer.param_groups:
        group["lr"] = lr
    expected = [p.detach().clone().double() for p in params]
    first = [torch.zeros_like(e) for e in expected]
    second = [torch.zeros_like(e) for e in expected]
    generator = torch.Generator().manual_seed(0)
    for t in (1, 2):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            decay = config.weight_decay if p.ndim >= 2 else 0.0
            first[i] = config.beta1 * first[i] + (1 - config.beta1) * g.double()
            second[i] = config.beta2 * second[i] + (1 - config.beta2) * g.double() ** 2
            step = (first[i] / (1 - config.beta1 ** t)) / ((second[i] / (1 - config.beta2 ** t)).sqrt() + config.adam_eps)
            expected[i] = expected[i] * (1 - lr * decay) - lr * step
    for (name, p), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_dropped_fraction_is_of_the_routed_slots(tiny_config, tmp_path):
    """dropped / routed (routed counts the dropped ones): the share of routed slots capacity cut."""
    config = tiny_config("configs/tiny_unipool_cpu.json", "moe.router=softmax", "moe.capacity_factor=0.5",
                         "train.eval_interval=0")
    metrics, routing = Trainer(config, tmp_path).train_step()
    routed = sum(int(c.sum()) for c in routing.counts_per_pool)
    assert routing.dropped > 0 and metrics["dropped_fraction"] == pytest.approx(routing.dropped / routed)


def test_logged_throughput_is_work_over_time_not_the_mean_of_step_rates(tiny_config, tmp_path, capsys):
    """Two steps of 1000 tokens in 0.1 s and 0.3 s: 2000 tokens in 0.4 s is 5,000 tokens/s (the
    plain mean of 10,000 and 3,333 would say 6,667), in the console line and in summary.json."""
    from megatron_unipool.training.metrics import MetricsLogger

    config = tiny_config("configs/tiny_unipool_cpu.json")
    logger = MetricsLogger(tmp_path, config.logging, max_steps=2)
    for step, seconds in ((1, 0.1), (2, 0.3)):
        logger.step(step, {"step_time_s": seconds, "tokens_per_second": 1000 / seconds, "tflops_per_device": 0.01 / seconds,
                           "mfu_percent": 1 / seconds})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "ms/step 200.0" in line and "tokens/s 5,000" in line and "TFLOP/s/device 0.050" in line, line
    assert "MFU % 5.0" in line, line  # 2 of work in 0.4 s, not the mean of 10 and 3.3

    trainer = Trainer(config, tmp_path / "run")
    trainer.state.tokens_per_second = [1.0, 1000.0, 3000.0]  # the first (warm-up) step is left out
    assert trainer.summary()["tokens_per_second"] == pytest.approx(1500.0)


def test_console_line_prints_the_current_lr_and_leaves_skipped_steps_out_of_means(tiny_config, tmp_path, capsys):
    """Megatron prints the logged step's learning rate, not the window's mean; a skipped step's NaN
    loss is counted as skipped, not averaged into the loss of the steps that trained."""
    from megatron_unipool.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tiny_config().logging, max_steps=3)
    for step, (lr, loss, skipped) in enumerate([(1e-3, 2.0, 0), (2e-3, float("nan"), 1), (3e-3, 4.0, 1)], start=1):
        logger.step(step, {"lr": lr, "lm_loss": loss, "skipped_steps": skipped})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "lr 3.000e-03" in line and "lm loss 3.0000" in line and "skipped steps 1" in line, line
    logger = MetricsLogger(tmp_path, tiny_config().logging, max_steps=2)
    for step, loss in enumerate([2.0, float("inf")], start=1):  # an inf loss is left out too; no skip yet: no counter
        logger.step(step, {"lm_loss": loss, "skipped_steps": 0})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "lm loss 2.0000" in line and "skipped steps" not in line, line


def test_eta_is_the_mean_time_of_this_session_steps_times_the_steps_left(tmp_path, capsys, monkeypatch):
    """Resumed at step 10 of 20, two steps of 2 s (the first one's time counted from before it
    started): 8 steps left at 2 s each is an ETA of 16 s; the steps before the resume are not counted."""
    from megatron_unipool.config import LoggingConfig
    from megatron_unipool.training import metrics

    clock = iter([0.0, 102.0, 104.0])  # logger start, first step end, second step end (the print)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    logger = metrics.MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, log_interval=2), max_steps=20,
                                   resumed_step=10)
    for step in (11, 12):
        logger.step(step, {"step_time_s": 2.0})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("step 12/20 |") and line.endswith("ETA 0:00:16"), line


def test_console_line_shows_the_dropped_share_as_a_percentage(tmp_path, capsys):
    from megatron_unipool.config import LoggingConfig
    from megatron_unipool.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, log_interval=1), max_steps=1)
    logger.step(1, {"dropped_fraction": 0.05})
    assert "dropped 5.00%" in capsys.readouterr().out


@pytest.mark.parametrize("variables, processes", [({"LOCAL_WORLD_SIZE": "3"}, 3), ({"LOCAL_SIZE": "4"}, 4), ({}, 1)])
def test_processes_per_host_are_read_from_either_launcher(variables, processes, monkeypatch):
    """torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE (reliability.md): the host memory
    check counts every process of the host."""
    from megatron_unipool.training.hardware import processes_on_this_host

    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert processes_on_this_host() == processes


def test_a_console_line_of_fewer_steps_than_the_interval_says_so(tmp_path, capsys):
    """Resumed at step 24 with a log interval of 5, step 25's line is the mean of one step: an unbroken run's
    line averages 21-25, so the two differ though the steps are the same."""
    from megatron_unipool.config import LoggingConfig
    from megatron_unipool.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, log_interval=5), max_steps=32, resumed_step=24)
    for step in range(25, 33):
        logger.step(step, {"lm_loss": float(step)})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" | ")[:2] for line in lines] == [["step 25/32 (window of 1 step)", "lm loss 25.0000"],
                                                          ["step 30/32", "lm loss 28.0000"],
                                                          ["step 32/32 (window of 2 steps)", "lm loss 31.5000"]]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("router, gating", [
    ("softmax", ["moe.normalize_gates=true"]), ("softmax", ["moe.softmax_before_topk=false"]),
    ("sigmoid", ["moe.normalize_gates=true"]), ("softmax", []), ("sigmoid", []), ("norm", []),
])
def test_top1_with_a_renormalised_gate_is_named_as_leaving_the_routers_to_the_balancing_losses(router, gating, top_k,
                                                                                                tiny_config):
    """MoEConfig.gate_is_always_one holds exactly where the LM loss gives the routers no gradient (top-1 with a
    renormalised gate; never at top-2)."""
    from megatron_unipool.model import LanguageModel

    config = tiny_config("configs/tiny_vanilla_cpu.json", f"moe.top_k={top_k}", f"moe.router={router}", *gating,
                         "moe.aux_loss=none", "model.seq_len=16")
    torch.manual_seed(0)
    model = LanguageModel(config.model, config.moe)
    tokens = torch.randint(0, config.model.vocab_size, (2, 17))
    logits, _ = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    router_gradient = max(p.grad.abs().max().item() for name, p in model.named_parameters() if "router" in name)
    assert config.moe.gate_is_always_one == (router_gradient < 1e-7), router_gradient


def test_the_trainer_says_when_only_the_balancing_losses_train_the_routers(tiny_config, tmp_path, capsys):
    config = tiny_config("configs/tiny_vanilla_cpu.json", "moe.normalize_gates=true", "train.max_steps=1",
                         "model.seq_len=16")
    Trainer(config, tmp_path / "run").train()
    assert "note: moe.top_k=1 with the gate renormalised over the one chosen expert" in capsys.readouterr().out


@pytest.mark.parametrize(("base", "setting"), [
    (["moe.aux_loss=none"], "moe.aux_loss_coeff=0.5"), (["moe.aux_loss=pool"], "moe.aux_loss_coeff=0.5"),
    (["moe.aux_loss=none"], "moe.pool_aux_lag=micro_batch"), (["moe.aux_loss=pool"], "moe.pool_aux_lag=micro_batch"),
    ([], "moe.bias_update_rate=0.5"), (["moe.bias_balancing=true"], "moe.bias_update_rate=0.5"),
    ([], "moe.lock_penalty=0.5"),
    (["moe.lock_start_step=1", "moe.lock_window_steps=1", "moe.lock_anneal_steps=2"], "moe.lock_penalty=0.5"),
])
def test_a_setting_is_noted_as_inert_exactly_when_it_changes_nothing(base, setting, tiny_config, tmp_path, capsys):
    """The note says a changed setting does nothing beside the others: the run with it trains exactly as the
    run without it; and a setting that does change the run gets no note."""
    def run(*overrides):
        config = tiny_config("configs/tiny_unipool_cpu.json", "train.max_steps=3", "model.seq_len=16",
                             "train.eval_interval=0", *base, *overrides)
        summary = Trainer(config, tmp_path / str(len(overrides))).train()
        return summary["train_losses"], capsys.readouterr().out

    losses, out = run()
    assert "has no effect" not in out
    changed_losses, out = run(setting)
    name, value = setting.split("=")
    noted = [line for line in out.splitlines() if line.startswith(f"note: {name}=") and "has no effect" in line]
    assert bool(noted) == (changed_losses == losses), (noted, losses, changed_losses)


def test_a_run_shorter_than_its_warmup_says_where_its_learning_rate_ends(tiny_config, tmp_path, capsys):
    config = tiny_config("configs/tiny_unipool_cpu.json", "train.max_steps=2", "train.warmup_steps=4",
                         "train.eval_batches=1", "model.seq_len=16")
    Trainer(config, tmp_path / "run").train()
    assert ("note: train.warmup_steps=4 > train.max_steps=2: the learning rate ends at 0.001, in warm-up, below"
            " train.lr=0.002") in capsys.readouterr().out
    Trainer(tiny_config("configs/tiny_unipool_cpu.json", "train.max_steps=2", "train.warmup_steps=2",
                        "train.eval_batches=1", "model.seq_len=16"), tmp_path / "equal").train()
    assert "note: train.warmup_steps" not in capsys.readouterr().out  # its last step is at train.lr


def test_tensorboard_that_cannot_be_imported_is_a_config_error_before_the_model_is_built(tiny_config, tmp_path,
                                                                                       monkeypatch):
    from megatron_unipool.config import ConfigError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(Trainer, "_checkpoint_to_resume", lambda self: pytest.fail("built the model first"))
    with pytest.raises(ConfigError, match="logging.tensorboard=true needs the tensorboard package"):
        Trainer(tiny_config("configs/tiny_dense_cpu.json", "logging.tensorboard=true"), tmp_path / "run")


def test_a_training_split_smaller_than_a_global_batch_is_noted(tiny_config, tmp_path, capsys):
    from megatron_unipool.data import IndexedDatasetWriter

    for split, tokens in (("train", 40), ("valid", 100)):  # 2 and 6 samples of 16 tokens (+1 for the target)
        with IndexedDatasetWriter(tmp_path / split, 320, 0, "test") as writer:
            writer.add_document(list(range(1, tokens)))
    config = tiny_config("configs/tiny_dense_cpu.json", "data.corpus=null", f"data.train_prefix={tmp_path / 'train'}",
                         f"data.valid_prefix={tmp_path / 'valid'}", "model.seq_len=16", "train.max_steps=1")
    Trainer(config, tmp_path / "run").train()
    assert ("note: the training split holds 2 samples of 16 tokens, fewer than a global batch of 8: every step"
            " reads some of them more than once") in capsys.readouterr().out


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA A10G", None), ("NVIDIA RTX A1000", None), ("Tesla V100-SXM2-16GB", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None), ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", None)])
def test_mfu_peak_matches_the_whole_device_name(name, tflops):
    """Datasheet dense bf16 peaks; a name that only contains a known one (A10G, RTX A1000) has no MFU, nor
    a MIG slice (a share of the card's SMs: MFU against the whole card's peak was up to 7x low)."""
    from megatron_unipool.training.hardware import peak_bf16_tflops

    assert peak_bf16_tflops(name) == tflops


def test_gpu_monitor_drops_a_counter_the_gpu_does_not_offer(monkeypatch, capsys):
    """On a MIG slice NVML refuses utilisation: that counter leaves the logs with one note, the
    others are still read every step, and training goes on."""
    from megatron_unipool.training.hardware import GpuMonitor

    class NotSupported(Exception):
        pass

    def refused():
        raise NotSupported("Not Supported")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "utilization", refused)
    monkeypatch.setattr(torch.cuda, "device_memory_used", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda: 250_000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**30)
    monitor = GpuMonitor()
    expected = {"gpu/max_allocated_gib": 1.0, "gpu/memory_used_gib": 3.0, "gpu/power_watts": 250.0}
    assert monitor.read() == expected and monitor.read() == expected
    assert capsys.readouterr().out == "note: gpu/utilisation_percent is not logged: NotSupported: Not Supported\n"
    assert "gpu/utilisation_percent" in GpuMonitor.COUNTERS  # dropped by this monitor, not for the next one
    # without nvidia-ml-py every NVML counter fails alike: one note for them all
    def refused_without_pynvml():
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    for counter in ("utilization", "device_memory_used", "power_draw"):
        monkeypatch.setattr(torch.cuda, counter, refused_without_pynvml)

    assert GpuMonitor().read() == {"gpu/max_allocated_gib": 1.0}
    assert capsys.readouterr().out == ("note: gpu/utilisation_percent, gpu/memory_used_gib, gpu/power_watts are not"
                                       " logged: ModuleNotFoundError: pynvml does not seem to be installed\n")
    assert GpuMonitor(torch.device("cpu")).read() == {}  # a run on the CPU of a GPU machine: the idle GPU's are not its


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_mode_makes_cublas_deterministic_on_gpus(deterministic, monkeypatch):
    """cuBLAS is only reproducible with CUBLAS_WORKSPACE_CONFIG set before it starts; a user's own
    setting is kept."""
    from megatron_unipool.training.trainer import seed_everything

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        seed_everything(0, deterministic)
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if deterministic else None)
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        seed_everything(0, deterministic)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(True, warn_only=True)  # as the other tests' trainers leave it


def test_bf16_and_capacity_runs(tiny_config, tmp_path):
    config = tiny_config("configs/tiny_unipool_cpu.json", "train.max_steps=8", "train.precision=bf16",
                         "moe.capacity_factor=0.5", "moe.router=softmax", "moe.top_k=2", "train.eval_interval=0",
                         "moe.z_loss_coeff=0.001")
    trainer = Trainer(config, tmp_path)
    summary = trainer.train()
    assert all(math.isfinite(x) for x in summary["train_losses"])
    assert summary["train_losses"][-1] < summary["train_losses"][0]


def test_data_that_does_not_fit_the_model_is_refused(tiny_config, tmp_path):
    with pytest.raises(ValueError, match=r"^data.tokenizer='byte' \(tokenising data.corpus='shakespeare'\) has a"
                                         " vocabulary of 257 tokens, larger than model.vocab_size=200"):
        Trainer(tiny_config("configs/tiny_unipool_cpu.json", "model.vocab_size=200"), tmp_path)
    train_prefix, valid_prefix = prepare_default_corpus("byte", tiny_config().data.cache_dir)
    with pytest.raises(DataError, match="^data.train_prefix was tokenised with a vocabulary of 257 tokens"):
        Trainer(tiny_config("configs/tiny_unipool_cpu.json", "model.vocab_size=200", "data.corpus=null",
                            f"data.train_prefix={train_prefix}", f"data.valid_prefix={valid_prefix}"), tmp_path)
    with pytest.raises(ValueError, match="seq_len|too short"):
        Trainer(tiny_config("configs/tiny_unipool_cpu.json", "model.seq_len=1000000"), tmp_path)
    with pytest.raises(DataError, match="indexed dataset file missing"):
        Trainer(tiny_config("configs/tiny_unipool_cpu.json", "data.corpus=null",
                            f"data.train_prefix={tmp_path}/none", f"data.valid_prefix={tmp_path}/none_valid"), tmp_path)


def test_a_parameter_no_token_reached_moves_like_it_does_under_every_parallel_layout(tiny_config, tmp_path):
    """When the NormRouter zeroes every score no token reaches the pool and autograd leaves its
    gradient None. Parallel runs sum a zero gradient for it (a replica elsewhere may have one), so
    AdamW decays it; one process must too, or the runs part (seen at pp2 and ep2, 2% in the gradient norm)."""
    from megatron_unipool.training.distributed import reduce_gradients

    trainer = Trainer(tiny_config("configs/tiny_unipool_cpu.json", "train.weight_decay=0.1"), tmp_path)
    trainer.compute_gradients()
    pool = trainer.model.expert_pools[0]
    before = pool.w_gate.detach().clone()
    for param in pool.parameters():
        param.grad = None
    reduce_gradients(trainer.model, trainer.specs, trainer.parallel)
    assert all(torch.equal(param.grad, torch.zeros_like(param)) for param in pool.parameters())
    trainer.backend.set_lr(0.01)
    trainer.backend.step()
    # AdamW's first step on a zero gradient: no Adam update, the decoupled weight decay only
    torch.testing.assert_close(pool.w_gate.detach(), before * (1 - 0.01 * 0.1), rtol=0, atol=1e-7)


def test_norm_router_slots_that_reach_no_expert_are_logged_per_layer(tiny_config, tmp_path):
    """A NormRouter token whose scores are all zero uses no expert: the share of such slots is in the
    console line (unrouted) and in TensorBoard per layer, where a layer going silent shows."""
    config = tiny_config("configs/tiny_unipool_cpu.json", "moe.top_k=2")
    trainer = Trainer(config, tmp_path)
    router = trainer.model.layers[3].ffn.router
    with torch.no_grad():  # every logit of layer 3 is -x_0: a token with x_0 >= 0 gets no expert at all
        router.weight.zero_()
        router.weight[:, 0] = -1.0
    silent = []
    router.register_forward_hook(lambda module, inputs, output: silent.append(int((inputs[0][:, 0] >= 0).sum())))
    metrics, routing = trainer.train_step()
    tokens = config.train.global_batch * config.model.seq_len
    per_layer = [1 - int(routing.counts_per_pool[0][layer].sum()) / (2 * tokens) for layer in range(4)]
    assert routing.slots_per_pool[0].tolist() == [2 * tokens] * 4
    assert [metrics[f"unrouted/layer{layer}"] for layer in range(4)] == pytest.approx(per_layer)
    assert metrics["unrouted_fraction"] == pytest.approx(sum(per_layer) / 4)
    assert per_layer[3] == pytest.approx(sum(silent) / tokens) and per_layer[3] > 0


def test_moe_losses_reach_the_gradients(tiny_config, tmp_path):
    """The step's gradient is autograd of LM loss + aux loss + z-loss as logged (the MoE losses
    could be logged yet left out of backward, and balancing would silently do nothing)."""
    trainer = Trainer(tiny_config("configs/tiny_vanilla_cpu.json", "train.global_batch=4", "moe.aux_loss_coeff=0.5",
                                  "moe.z_loss_coeff=0.1"), tmp_path)
    reference = copy.deepcopy(trainer.model)
    tokens = trainer.data.train.batch(0, trainer.config.train.global_batch)
    logits, losses = reference(tokens[:, :-1])
    assert losses.keys() == {"aux_loss", "z_loss"}
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + sum(losses.values())
    loss.backward()
    totals = trainer.compute_gradients()
    torch.testing.assert_close(totals[1:3], torch.stack([losses["aux_loss"], losses["z_loss"]]).detach())
    expected = dict(reference.named_parameters())
    routers = [name for name in expected if "router" in name]
    assert routers
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-5, atol=1e-8, msg=name)


def test_logged_rates_and_summary_follow_their_formulas(tiny_config, tmp_path, monkeypatch):
    """With every step taking 0.25 s on the trainer's clock: tokens/s is global batch x seq_len / 0.25,
    TFLOP/s per device that times the model FLOPs per token / world size / 1e12, MFU its share of the
    device peak; the summary's parameter counts are the budget's and its vocabulary the tokenizer's;
    the run keeps checkpoint.keep_last checkpoints."""
    import megatron_unipool.training.trainer as trainer_module
    from megatron_unipool.training.metrics import MetricsLogger

    ticks = iter(0.25 * i for i in range(10_000))
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: next(ticks))
    asked = []  # the peak of the run's precision on its device: 2e12 FLOP/s here
    monkeypatch.setattr(trainer_module, "peak_flops", lambda precision, device: asked.append((precision, device)) or 2e12)
    logged = []
    monkeypatch.setattr(MetricsLogger, "step", lambda self, step, metrics: logged.append(dict(metrics)))
    config = tiny_config("configs/tiny_vanilla_cpu.json", "train.max_steps=3", "checkpoint.save_interval=1",
                         "checkpoint.keep_last=2", "train.eval_interval=0")
    trainer = Trainer(config, tmp_path)
    summary = trainer.train()
    tokens_per_second = config.train.global_batch * config.model.seq_len / 0.25
    flops = tokens_per_second * trainer.budget.train_flops_per_token
    assert len(logged) == 3
    for metrics in logged:
        assert metrics["step_time_s"] == 0.25 and metrics["tokens_per_second"] == pytest.approx(tokens_per_second)
        assert metrics["tflops_per_device"] == pytest.approx(flops / 1e12)
        assert metrics["mfu_percent"] == pytest.approx(100 * flops / 2e12)
    assert summary["tokens_per_second"] == pytest.approx(tokens_per_second) and asked == [(config.train.precision, trainer.device)]
    assert (summary["total_params"], summary["active_params"]) == (trainer.budget.total_params,
                                                                   trainer.budget.active_params)
    assert summary["total_params"] > summary["active_params"]  # vanilla MoE: a swap would show
    assert summary["tokenizer_vocab_size"] == trainer.data.vocab_size < config.model.vocab_size
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000003"]


def test_console_window_and_tensorboard_names(tmp_path, capsys):
    """Each console line averages its own log interval only, shows counters and lr at their latest
    values; metric names with a '/' (unrouted/layer<i>, gpu/...) keep their own TensorBoard section;
    perplexity is exp(loss) up to losses of 50."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_unipool.config import LoggingConfig
    from megatron_unipool.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=True, log_interval=2), max_steps=4)
    for step, (loss, skipped) in enumerate([(1.0, 0), (3.0, 0), (5.0, 1), (9.0, 3)], start=1):
        logger.step(step, {"lm_loss": loss, "skipped_steps": skipped, "unrouted/layer0": 0.5})
    lines = capsys.readouterr().out.strip().splitlines()
    assert "lm loss 2.0000" in lines[0] and "skipped steps" not in lines[0]
    assert "lm loss 7.0000" in lines[1] and "skipped steps 3" in lines[1], lines  # not the mean, 2
    logger.evaluation(4, 8.0)
    logger.close({})
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert "unrouted/layer0" in events.Tags()["scalars"] and "train/lm_loss" in events.Tags()["scalars"]
    assert events.Scalars("validation/perplexity")[0].value == pytest.approx(math.exp(8.0), rel=1e-6)


def test_files_are_named_by_the_shortest_ending_that_tells_them_apart():
    from megatron_unipool.training.metrics import distinct_names

    assert distinct_names(["/data/code/valid", "/data/web/valid", "/data/books"]) == {
        "/data/code/valid": "code/valid", "/data/web/valid": "web/valid", "/data/books": "books"}
    # one path the whole ending of another: the shorter is named whole, without its root (no '//' in a tag)
    assert distinct_names(["/data/web/valid", "/mnt/data/web/valid"]) == {
        "/data/web/valid": "data/web/valid", "/mnt/data/web/valid": "mnt/data/web/valid"}
    assert distinct_names(["/solo/valid"]) == {"/solo/valid": "valid"} and distinct_names([]) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="names the CPU")
def test_a_cpu_is_named_with_the_threads_its_timings_ran_on(monkeypatch):
    from megatron_unipool.training.hardware import device_name

    for threads, named in ((1, "1 thread"), (2, "2 threads")):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        assert device_name() == f"cpu ({os.cpu_count()} cores, {named})"


def test_mfu_peak_is_in_flop_per_second_and_the_gpu_monitor_reads_nothing_without_a_gpu(monkeypatch):
    from megatron_unipool.training.hardware import GpuMonitor, peak_flops

    assert GpuMonitor().read() == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H100 80GB HBM3")
    assert peak_flops() == pytest.approx(989e12) and peak_flops("bf16") == peak_flops()
    assert peak_flops("fp32") is None  # fp32 GEMMs are far from the bf16 tensor-core peak: no MFU
    assert peak_flops("bf16", torch.device("cpu")) is None and peak_flops("bf16", torch.device("cuda", 0)) == peak_flops()


def test_a_pool_with_nothing_routed_leaves_the_other_pools_logged(tmp_path):
    """Only the empty pool is skipped: a later pool's load (and the heatmap) are still logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_unipool.config import LoggingConfig
    from megatron_unipool.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=True), max_steps=1)
    empty, routed = torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 0, 3]])  # pool 1: loads 1, 0, 3 of 4
    logger.utilisation(1, [empty, routed], [[0, 1], [2]], image=True)
    logger.close({})
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0, "images": 0}).Reload()
    assert events.Tags()["histograms"] == ["pool1/expert_load"]
    assert events.Scalars("pool1/max_over_mean_load")[0].value == pytest.approx(3 / (4 / 3))
    assert "pool/utilisation" in events.Tags()["images"]


def test_micro_batch_lag_carries_the_last_micro_batch_into_the_next_step(tiny_config, tmp_path):
    """moe.pool_aux_lag=micro_batch is a one-micro-batch lag across step boundaries too: after a step,
    each pool's f_bar is the load fraction of that step's last micro-batch (which the next step's first
    micro-batch reads), as a reference that closes every micro-batch itself computes."""
    trainer = Trainer(tiny_config("configs/tiny_unipool_cpu.json", "moe.pool_aux_lag=micro_batch", "train.max_steps=2"), tmp_path)
    train = trainer.config.train
    reference = copy.deepcopy(trainer.model).train()
    for first in range(0, train.global_batch, train.micro_batch):
        with torch.no_grad():
            reference(trainer.data.train.batch(first, train.micro_batch)[:, :-1])
        reference.end_micro_batch()
    trainer.train_step()
    assert len(reference.pool_stats) > 0
    for got, want in zip(trainer.model.pool_stats, reference.pool_stats):
        assert bool(got.has_load_fraction) and bool(want.has_load_fraction)
        torch.testing.assert_close(got.load_fraction, want.load_fraction, rtol=1e-6, atol=0)


def test_a_resume_with_another_global_batch_reads_on_from_the_consumed_samples(tiny_config, tmp_path):
    """The data position is the samples consumed (datasets: "resuming needs nothing but the number of
    samples already consumed"), not step x the current global batch: a resume that changes
    train.global_batch continues at the next unseen sample."""
    first = Trainer(tiny_config("configs/tiny_unipool_cpu.json", "train.max_steps=2", "train.eval_interval=0", "train.global_batch=8"),
                    tmp_path / "first")
    first.train()
    payload = load_checkpoint(tmp_path / "first" / "checkpoints" / "step_0000002")
    consumed = payload["train_state"]["consumed_samples"]
    resumed = Trainer(tiny_config("configs/tiny_unipool_cpu.json", "train.max_steps=3", "train.eval_interval=0", "train.global_batch=4",
                                  f"checkpoint.load={tmp_path / 'first'}"), tmp_path / "resumed")
    starts = []
    read = resumed.data.train.batch
    resumed.data.train.batch = lambda start, size: starts.append((start, size)) or read(start, size)
    resumed.train_step()
    train = resumed.config.train
    assert starts == [(consumed + i, train.micro_batch) for i in range(0, train.global_batch, train.micro_batch)]
    assert resumed.state.consumed_samples == consumed + train.global_batch


def test_a_skipped_steps_routing_does_not_reach_the_next_steps_micro_batch_lag(tiny_config, tmp_path):
    """moe.pool_aux_lag=micro_batch: a step skipped for a non-finite loss changes no balancing statistic, so
    the next step's pool losses are those of a model that never ran it (its batch consumed): each micro-batch
    reads the previous one's f_bar, the first one the f_bar the last applied step left."""
    trainer = Trainer(tiny_config("configs/tiny_unipool_cpu.json", "moe.pool_aux_lag=micro_batch", "train.max_steps=4",
                                  "train.eval_interval=0"), tmp_path)
    train = trainer.config.train
    trainer.train_step()
    trainer.train_step()
    reference = copy.deepcopy(trainer.model).train()
    compute = trainer.compute_gradients

    def poisoned():  # step 3's loss is not finite: skipped
        totals = compute()
        if trainer.state.step == 2:
            totals[0] = float("inf")
        return totals

    trainer.compute_gradients = poisoned
    trainer.train_step()
    assert trainer.state.skipped_steps == 1
    metrics, _ = trainer.train_step()
    aux = []
    for first in range(3 * train.global_batch, 4 * train.global_batch, train.micro_batch):
        with torch.no_grad():
            _, losses = reference(trainer.data.train.batch(first, train.micro_batch)[:, :-1])
        aux.append(losses["aux_loss"].item())
        reference.end_micro_batch()
    assert metrics["aux_loss"] == pytest.approx(sum(aux) / len(aux), rel=1e-5)


def test_dropped_fraction_is_of_the_routed_slots_when_norm_router_leaves_slots_empty(tiny_config, tmp_path):
    """With slots that reach no expert (NormRouter, top_k above the positive scores of many tokens) the routed
    slots are fewer than all slots: the logged share is of the routed ones, as with the other routers."""
    config = tiny_config("configs/tiny_unipool_cpu.json", "moe.router=norm", "moe.top_k=20", "moe.capacity_factor=0.5",
                         "train.eval_interval=0")
    metrics, routing = Trainer(config, tmp_path).train_step()
    assert routing.dropped > 0 and routing.routed < routing.slots
    assert metrics["dropped_fraction"] == pytest.approx(routing.dropped / routing.routed)


def test_a_stop_request_during_the_last_step_lets_the_run_finish(tiny_config, tmp_path):
    """The last step saves anyway: a stop request then ends the run as finished (final evaluation, summary),
    as the uninterrupted run does, not with RunStopped and a rerun left to do."""
    import json

    overrides = ["train.max_steps=2", "train.eval_interval=0"]
    whole = Trainer(tiny_config("configs/tiny_unipool_cpu.json", *overrides), tmp_path / "whole").train()
    trainer = Trainer(tiny_config("configs/tiny_unipool_cpu.json", *overrides), tmp_path / "stopped")
    summary = trainer.train(stop_requested=lambda: trainer.state.step == trainer.config.train.max_steps)
    assert summary["train_losses"] == whole["train_losses"] and summary["val_losses"] == whole["val_losses"]
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("kind", ["dense", "unipool"])
def test_the_trainer_clips_the_gradient_adam_sees_to_train_grad_clip(kind, tiny_config, tmp_path):
    """train.grad_clip reaches the step: with a limit below the step's gradient norm (logged before clipping),
    the gradients the optimizer used have exactly that norm; with 0 they are left as they are."""
    for clip in (1e-3, 0.0):
        trainer = Trainer(tiny_config(f"configs/tiny_{kind}_cpu.json", f"train.grad_clip={clip}",
                                      "train.eval_interval=0"), tmp_path / str(clip))
        metrics, _ = trainer.train_step()
        used = torch.cat([p.grad.double().flatten() for p in trainer.model.parameters()]).norm().item()
        assert metrics["grad_norm"] > 1e-3
        assert used == pytest.approx(clip if clip else metrics["grad_norm"], rel=1e-5)
