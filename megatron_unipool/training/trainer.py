"""The training loop, on one process or many: gradient accumulation or the 1F1B pipeline
schedule, gradient reduction, balancing-statistics bookkeeping, evaluation, logging and checkpoints.

Loss normalisation follows the layout-invariance rules of the design note: the LM loss is the
sum of token losses divided by the tokens of the whole global batch, and each micro-batch's MoE
losses are averaged over all micro-batches of the step (on every data-parallel rank). Each rank
backpropagates its share, so gradients are summed across ranks and any layout computes the same
step as one process. Data-parallel rank r takes the r-th contiguous slice of the global batch,
`train.micro_batch` sequences at a time: the micro-batches are those of a single-process run.

A step whose loss or gradient norm is not finite updates nothing (weights, optimizer, balancing
statistics) but consumes its batch, as Megatron does; `train.max_consecutive_skips` of them in a
row stop the run with `NonFiniteError`, before anything is saved.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..config import MOE_LOSSES, Config, ConfigError, TrainConfig, config_to_dict
from ..data import Samples
from ..model import LanguageModel, RoutingStepStats, lm_loss_sum, param_budget
from ..model.sharding import shard_model
from ..parallel import ParallelState, all_reduce
from ..parallel.agreement import check_agreement, decided_by_rank0, on_any_rank, on_every_rank
from ..parallel.pipeline import StageChannel, forward_only, one_forward_one_backward
from .checkpoint import (CheckpointError, adopt_lock_change, changed_settings, check_run_directory, check_same_head_split,
                         checkpoint_payload, checkpoint_to_resume, checkpoints_dir, hold_run_directory, latest_checkpoint,
                         load_checkpoint, os_error_text, restore_model, save_checkpoint, set_rng_state,
                         training_fingerprint)
from .datasets import DataError, blend_note, build_datasets, replica_share, seq_len_note, validation_batches
from .backends import build_backend
from .distributed import gather_full_state
from .hardware import check_fits_host_memory, peak_flops, processes_on_this_host
from .metrics import MetricsLogger, check_tensorboard
from .optimizer import learning_rate


class Validation(NamedTuple):
    loss: float  # the validation split's mean token loss (data.valid_per_file: the files' weighted by the blend)
    by_file: dict[str, float]  # data.valid_per_file: each file's own, by prefix; else empty


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN or infinite loss or gradient."""


class RunStopped(Exception):
    """The run stopped early on request (`Trainer.train`'s stop_requested), after saving `checkpoint`
    (on rank 0; None on the others) at the end of step `step`."""

    def __init__(self, step: int, checkpoint: Optional[Path]):
        super().__init__(f"stopped at the end of step {step}, checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs."""

    step: int = 0
    consumed_samples: int = 0
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    # data.valid_per_file: each validation file's losses, by its prefix (val_losses holds the blend's)
    val_losses_by_file: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tokens_per_second: list[float] = field(default_factory=list)
    # where each resume started: that step's time includes warm-up (allocation, compilation), as step 1's does
    resumed_at_steps: list[int] = field(default_factory=list)
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    consecutive_skips: int = 0
    tokenizer: Optional[str] = None  # that wrote the training data, as its index names it (None: not recorded)
    # its vocabulary and end-of-document id, as the index records them: what tools/evaluate.py checks other files by
    tokenizer_vocab_size: Optional[int] = None
    eod_id: Optional[int] = None
    training_content: Optional[str] = None  # of the training files (RunData.training_content; None: not recorded)


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic and torch.cuda.is_available():  # read when cuBLAS starts; without it cuBLAS only warns
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # deterministic mode also NaN-fills every torch.empty, a debugging aid that costs a full write of
    # each buffer our kernels then overwrite (a third of the expert backward on CPU)
    torch.utils.deterministic.fill_uninitialized_memory = False


def autocast(config: Config, device: torch.device):
    if config.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """Trains this rank's part of the model; `parallel` holds the layout (one process by default)."""

    def __init__(self, config: Config, run_dir: str | Path, device: Optional[torch.device] = None,
                 parallel: Optional[ParallelState] = None):
        self.config = config
        self.parallel = parallel or ParallelState()
        self.layout = self.parallel.layout
        self.is_logger = self.layout.rank == 0
        self.run_dir = Path(run_dir)
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        check_tensorboard(config.logging)  # before the data and the model, on every rank
        seed_everything(config.train.seed, config.train.deterministic)
        decided_by_rank0(lambda: check_run_directory(self.run_dir), self.parallel)  # before the data and the model
        self.data = on_every_rank(lambda: build_datasets(config), self.parallel, (DataError,))  # node-local files
        check_agreement(self.data.fingerprint(), self.parallel, DataError,
                        "the ranks read different data (node-local copies of the files differ)",
                        lambda theirs, ours: "; ".join(f"{split} {theirs[split]} (rank 0: {ours[split]})"
                                                       for split in ours if theirs[split] != ours[split]))
        self.budget = param_budget(config.model, config.moe)
        on_every_rank(lambda: check_fits_host_memory(self.budget.total_params, "the model", processes_on_this_host()),
                      self.parallel, (ConfigError,))
        model = LanguageModel(config.model, config.moe)  # the full model, identical on every rank
        read = {"tokenizer": self.data.tokenizer, "tokenizer_vocab_size": self.data.vocab_size,  # what it reads
                "eod_id": self.data.eod_id, "training_content": self.data.training_content()}
        self.state = TrainState(**read)
        self.checkpoints = checkpoints_dir(self.run_dir)
        payload, source = self._checkpoint_to_resume()
        # the last checkpoint of its run, which is saved before that run's final evaluation (see _train)
        self.resumed_at_its_runs_end = payload is not None and (
            payload["train_state"]["step"] == payload["config"]["train"]["max_steps"])
        if payload is not None:
            payload["model"] = adopt_lock_change(model, payload["model"], payload["train_state"]["step"])
            restore_model(model, payload["model"], source)
            check_same_head_split(payload["config"], config, source)  # on every rank alike, before sharding
        self.specs = shard_model(model, self.parallel)
        self.model = model.to(self.device)
        train = config.train
        self.backend = build_backend(self.model, config, self.specs, self.parallel,
                                     micro_batches=train.micro_batches(self.layout.dp))
        if payload is not None:
            self.backend.load_state(payload["model"], payload["optimizer"])
            saved_state = payload["train_state"]
            self.state = TrainState(**{**saved_state, **read})
            set_rng_state(payload["rng"])
            if self.is_logger:
                print(f"resumed from {source} at step {self.state.step} ({self.state.consumed_samples} samples)",
                      flush=True)
                self._note_changed_schedule(payload["config"]["train"])
                self._note_changed_settings(changed_settings(payload["config"], config, self.state.step),
                                            payload["config"]["train"]["seed"], saved_state.get("tokenizer"),
                                            saved_state.get("training_content"))
                note = seq_len_note(config.model.seq_len, payload["config"]["model"]["seq_len"], "the checkpoint's",
                                    self.state.consumed_samples)
                if note:
                    print(note, flush=True)
        self.channel = StageChannel(self.parallel, (train.micro_batch, config.model.seq_len, config.model.hidden_size),
                                    self.backend.activation_dtype, self.device)

    def _note_changed_schedule(self, saved_train: dict) -> None:
        """A changed train.max_steps recomputes the learning-rate decay (how a run is extended): say so, with the
        rate the checkpoint's own schedule would have given next (`saved_train`: its train section)."""
        train, step = self.config.train, self.state.step
        saved_max_steps = saved_train["max_steps"]
        if saved_max_steps == train.max_steps:
            return
        if step >= train.max_steps:
            print(f"note: the checkpoint is at step {step} and train.max_steps={train.max_steps}: nothing left to"
                  " train, only the final evaluation runs", flush=True)
            return
        # the checkpoint's own schedule; a key an older checkpoint lacks takes its default (cosine: the only one then)
        saved = TrainConfig(**{f.name: saved_train[f.name] for f in fields(TrainConfig) if f.name in saved_train})
        before = learning_rate(step, saved)
        cooldown = ""
        if train.lr_decay == "wsd":
            start = train.max_steps - train.lr_cooldown_steps + 1  # numbered as the log numbers steps
            where = (f"now starts at step {start}" if start > step
                     else f"began at step {start}, before this resume: the run continues inside it")
            cooldown = f"; the cool-down (train.lr_cooldown_steps={train.lr_cooldown_steps}) {where}"
        print(f"note: train.max_steps={train.max_steps}, the checkpoint's run had {saved_max_steps}: the learning-rate"
              f" decay is recomputed, the next step's rate is {learning_rate(step, train):.3e} (was {before:.3e})"
              + cooldown, flush=True)

    def _note_changed_settings(self, changed: dict, saved_seed: int, saved_tokenizer: Optional[str],
                               saved_content: Optional[str]) -> None:
        """What a resume may change on purpose (a RoPE base for longer contexts, routing, balancing, the learning
        rate, the data) but which makes it another run than the checkpoint's: listed, so that a stale --set or
        config, or a run directory two configs share, is seen."""
        if changed:
            print("note: resumed with settings other than the checkpoint's: " + ", ".join(
                f"{name}={new!r} (was {old!r})" for name, (old, new) in changed.items()), flush=True)
        if saved_seed != self.config.train.seed:  # the sample order is a function of (seed, epoch)
            print(f"note: train.seed={self.config.train.seed}, the checkpoint's run had {saved_seed}: the rest of the"
                  " epoch is read in another order, so some samples repeat ones it trained on and others are"
                  f" skipped; keep train.seed={saved_seed} to continue with the next unseen batch", flush=True)
        if saved_tokenizer and self.state.tokenizer and saved_tokenizer != self.state.tokenizer:  # retokenised
            print(f"note: the training data was written by tokenizer {self.state.tokenizer}, the checkpoint's run's by"
                  f" {saved_tokenizer}: its token ids mean other text than the ones the model learned", flush=True)
        elif saved_content and (changed := [prefix for prefix, digest in self.data.training_hashes().items()
                                             if digest not in saved_content.split(", ")]):  # other files, or rewritten
            print(f"note: {', '.join(changed)} hold{'s' * (len(changed) == 1)} other data than the checkpoint's run read"
                  f" (by content hash): the run reads the training files from sample {self.state.consumed_samples:,}"
                  " on, where the checkpoint's data stopped, not from their start", flush=True)

    def _checkpoint_to_resume(self):
        """checkpoint.checkpoint_to_resume's choice and its payload. Rank 0 chooses for all, so no node
        resumes from another step because its view of the files differs."""
        def load(path: Path) -> dict:
            if not path.exists():
                raise CheckpointError(f"{path}, which rank 0 resumes from, is not visible here: rank 0 writes the"
                                      " checkpoints, so every node must see the run directory (a shared file system)")
            return load_checkpoint(path)

        path = decided_by_rank0(lambda: checkpoint_to_resume(self.config, self.run_dir), self.parallel)
        if path is None:
            return None, None
        payload = on_every_rank(lambda: load(path), self.parallel, (CheckpointError,))
        check_agreement(training_fingerprint(payload), self.parallel, CheckpointError,
                        f"the ranks read different checkpoints at {path} (node-local copies of the run directory:"
                        " every node must see rank 0's, a shared file system)",
                        lambda theirs, ours: f"{theirs} (rank 0: {ours})")
        return payload, path

    def save(self) -> Optional[Path]:
        """Gather the full model and optimizer state and write them (rank 0); every rank must call it,
        and every rank raises CheckpointError if rank 0 refuses to write (NaN)."""
        full = gather_full_state(self.model, self.backend.model_tensors(), self.backend.optimizer_tensors(), self.specs,
                                 self.parallel)
        path, refusal = None, None
        if full is not None:
            payload = checkpoint_payload(self.config, *full, asdict(self.state))
            try:
                path = save_checkpoint(self.checkpoints, self.state.step, payload, self.config.checkpoint.keep_last)
            except CheckpointError as e:
                refusal = e
        refused = on_any_rank(refusal is not None, self.parallel)
        if refusal is not None:
            raise refusal
        if refused:
            raise CheckpointError(f"rank 0 refused to write the step {self.state.step} checkpoint (see its error)")
        return path

    def _reduce_routing(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce(tensor, self.parallel.routing_group)

    def _run_micro_batches(self, batches: list[torch.Tensor], train: bool) -> torch.Tensor:
        """Forward (and backward) every micro-batch through this rank's stage.

        Returns the step's totals of the LM loss and of each of MOE_LOSSES, each divided as in the
        training loss: every rank's shares, already all-reduced over the world (tensor-parallel ranks,
        which computed the same values, count once).
        """
        cfg = self.config
        global_tokens = len(batches) * self.layout.dp * batches[0][:, 1:].numel()
        micro_batches_in_step = len(batches) * self.layout.dp
        totals = torch.zeros(1 + len(MOE_LOSSES), device=self.device)
        if self.device.type == "cuda":  # a copy from pageable memory would wait for the device to drain first
            batches = [batch.pin_memory() for batch in batches]

        def forward_step(i: int, hidden: Optional[torch.Tensor]):
            if train and i > 0:
                self.model.end_micro_batch(self._reduce_routing)
            tokens = batches[i].to(self.device, non_blocking=True)
            documents = self.model.documents_of(tokens[:, :-1], self.data.eod_id)  # every stage: from the tokens
            with autocast(cfg, self.device):
                out, moe_losses = self.model(tokens[:, :-1] if hidden is None else hidden, documents)
            loss = None
            for j, name in enumerate(MOE_LOSSES, start=1):
                if name in moe_losses:
                    share = moe_losses[name] / micro_batches_in_step
                    totals[j] += share.detach()
                    loss = share if loss is None else loss + share
            if self.channel.last:
                logits, targets = out.flatten(0, 1), tokens[:, 1:].flatten()
                lm = lm_loss_sum(logits, targets, cfg.train.cross_entropy, self.parallel.tp_group)
                totals[0] += lm.detach() / global_tokens
                loss = lm / global_tokens if loss is None else lm / global_tokens + loss
                out = None
            return out, (loss * self.backend.loss_scale if loss is not None else None)

        if train:
            one_forward_one_backward(len(batches), forward_step, self.channel, self.backend.backward)
            self.model.end_micro_batch(self._reduce_routing)
        else:
            with torch.no_grad():
                forward_only(len(batches), forward_step, self.channel)
        if self.layout.tp_rank != 0:  # tensor-parallel ranks computed the same values
            totals.zero_()
        if self.parallel.distributed:
            dist.all_reduce(totals)
        return totals

    def compute_gradients(self) -> torch.Tensor:
        """Forward and backward of this rank's share of the next global batch, gradients reduced over
        their replicas: afterwards every rank holds its slice of the single-process gradient."""
        train, layout = self.config.train, self.layout
        per_rank = train.global_batch // layout.dp
        first = self.state.consumed_samples + layout.dp_rank * per_rank
        batches = [self.data.train.batch(first + i, train.micro_batch) for i in range(0, per_rank, train.micro_batch)]
        self.backend.zero_grad()
        totals = self._run_micro_batches(batches, train=True)
        self.backend.reduce()
        return totals

    def train_step(self) -> tuple[dict, RoutingStepStats]:
        """One optimizer step over the global batch: (metrics, the step's routing statistics)."""
        train = self.config.train
        lr = learning_rate(self.state.step, train)
        self.backend.set_lr(lr)
        # reduced over all ranks: every rank sees the same values, read to the host at once
        totals = self.compute_gradients().tolist()
        skip = not all(math.isfinite(total) for total in totals)
        grad_norm, applied = self.backend.step(skip=skip)
        if skip and applied:  # ZeRO decides itself, from the gradient norm: one it did not find non-finite
            raise NonFiniteError(
                f"step {self.state.step + 1}: the loss was not finite (loss {totals[0]:.4f}) but DeepSpeed applied"
                f" the update (gradient norm {grad_norm:.4g}): the weights are no longer finite and nothing was saved;"
                " continue from the latest checkpoint, with a deepspeed.config_file that keeps its overflow checks")
        routing = self.model.end_optimizer_step(self._reduce_routing, applied=applied)
        self.state.step += 1
        if applied:
            self.model.end_lock_step(self.state.step, routing)
        self.state.consumed_samples += train.global_batch
        self._count_skip(applied, totals[0], grad_norm)
        metrics = {"lr": lr, "lm_loss": totals[0], "grad_norm": grad_norm,
                   "skipped_steps": self.state.skipped_steps}
        moe = self.config.moe
        metrics.update({name: totals[1 + MOE_LOSSES.index(name)] for name in moe.active_losses()})
        if routing.routed:
            metrics["dropped_fraction"] = routing.dropped / routing.routed
        if moe.kind != "dense" and moe.router == "norm":  # the one router that can leave a slot without an expert
            metrics["unrouted_fraction"] = routing.unrouted_fraction()
            for layer, share in routing.unrouted_per_layer(moe.pool_layout(self.config.model.num_layers)).items():
                metrics[f"unrouted/layer{layer}"] = share
        return metrics, routing

    def _count_skip(self, applied: bool, loss: float, grad_norm: float) -> None:
        state, limit = self.state, self.config.train.max_consecutive_skips
        if applied:
            state.consecutive_skips = 0
            return
        state.skipped_steps += 1
        state.consecutive_skips += 1
        if self.is_logger:
            print(f"step {state.step}: non-finite loss or gradient (loss {loss:.4f}, gradient norm {grad_norm:.4g}), "
                  f"update skipped ({state.consecutive_skips} in a row, {state.skipped_steps} in all; the run stops at "
                  f"{limit} in a row)", flush=True)
        if state.consecutive_skips >= limit:
            latest = latest_checkpoint(self.checkpoints) if self.checkpoints.is_dir() else None
            raise NonFiniteError(
                f"{limit} steps in a row (up to step {state.step}) had a non-finite loss or gradient norm "
                f"(last: loss {loss:.4f}, gradient norm {grad_norm:.4g}); stopping without saving. "
                + (f"The latest checkpoint, {latest}, holds finite weights" if latest else "No checkpoint was written")
                + ": lower train.lr, raise train.warmup_steps or check the data near sample "
                f"{state.consumed_samples - self.config.train.global_batch}.")

    @torch.no_grad()
    def evaluate(self) -> Validation:
        """The validation loss; under data.valid_per_file, each file's too, and their mean weighted by each file's
        share of the blend (the mean a mixed evaluation estimates)."""
        self.model.eval()
        valid = self.data.valid
        if self.config.data.valid_per_file:  # a blend of several files: the config refuses the setting otherwise
            by_file = {name: self._mean_loss(source) for name, source in zip(valid.names, valid.sources)}
            loss = sum(share * by_file[name] for name, share in zip(valid.names, valid.shares.tolist())) / valid.period
        else:
            by_file, loss = {}, self._mean_loss(valid)
        self.model.train()
        return Validation(loss, by_file)

    def _mean_loss(self, samples: Samples) -> float:
        """Mean token loss over the validation batches of `samples` (datasets.validation_batches), each evaluated
        by one data-parallel replica (datasets.replica_share): the same mean as one process's, in 1/dp of its
        time."""
        train, layout = self.config.train, self.layout
        batches = validation_batches(samples, train.micro_batch, train.eval_batches * train.global_batch)
        return self._run_micro_batches(replica_share(batches, layout.dp, layout.dp_rank), train=False)[0].item()

    def train(self, stop_requested: Optional[Callable[[], bool]] = None) -> dict:
        """Train to train.max_steps and return the summary. `stop_requested` (a preemption signal seen) is
        asked at the end of each step; once it holds on any rank, every rank saves the step (unless it
        was just saved) and raises RunStopped, so the rerun resumes with nothing lost. The run directory is
        this job's while it trains (rank 0 holds it): another job training in it is refused."""
        with contextlib.ExitStack() as held:
            decided_by_rank0(lambda: held.enter_context(hold_run_directory(self.run_dir)), self.parallel)
            return self._train(stop_requested)

    def _train(self, stop_requested: Optional[Callable[[], bool]]) -> dict:
        cfg = self.config
        logger = MetricsLogger(self.run_dir, cfg.logging, cfg.train.max_steps, enabled=self.is_logger,
                               resumed_step=self.state.step, device=self.device)
        # of one device; TFLOP/s and MFU are per device, as Megatron logs them
        peak = peak_flops(cfg.train.precision, self.device)
        tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
        if self.is_logger:
            L = self.layout
            print(f"training {cfg.moe.kind} model: {self.budget.total_params:,} parameters, "
                  f"{self.budget.active_params:,} active per token, {len(self.data.train):,} training samples of "
                  f"{cfg.model.seq_len} tokens, layout tp {L.tp} pp {L.pp} dp {L.dp} ep {L.ep}; "
                  f"run directory {self.run_dir}", flush=True)
            if cfg.train.warmup_steps > cfg.train.max_steps:  # equal: the last step reaches train.lr
                print(f"note: train.warmup_steps={cfg.train.warmup_steps} > train.max_steps={cfg.train.max_steps}:"
                      f" the learning rate ends at {learning_rate(cfg.train.max_steps - 1, cfg.train):.3g}, in warm-up,"
                      f" below train.lr={cfg.train.lr:g}", flush=True)
            note = blend_note(self.data.train, cfg.train.global_batch, cfg.train.max_steps)
            if note:
                print(note, flush=True)
            if len(self.data.train) < cfg.train.global_batch:
                print(f"note: the training split holds {len(self.data.train)} samples of {cfg.model.seq_len} tokens,"
                      f" fewer than a global batch of {cfg.train.global_batch}: every step reads some of them"
                      f" more than once", flush=True)
            if cfg.moe.gate_is_always_one:
                print("note: moe.top_k=1 with the gate renormalised over the one chosen expert (moe.normalize_gates, or"
                      " softmax after top-k): every gate is 1, so the LM loss gives the routers no gradient and only"
                      " the balancing losses train them (Switch Transformer gates by the softmax probability)",
                      flush=True)
            for setting in cfg.moe.inert_settings():
                print(f"note: {setting}", flush=True)
            if cfg.model.compile:
                print("note: model.compile: the first step (and the first evaluation) also compiles the blocks, so its"
                      " time and tokens/s understate the run's", flush=True)
        if 0 < self.state.step < cfg.train.max_steps:
            self.state.resumed_at_steps.append(self.state.step + 1)
            if self.resumed_at_its_runs_end and not self._evaluated_at(self.state.step):
                self._record_evaluation(logger)  # that run's final evaluation: an extended run has it as the longer one
        while self.state.step < cfg.train.max_steps:
            started = time.perf_counter()
            metrics, routing = self.train_step()
            elapsed = time.perf_counter() - started
            step = self.state.step
            self.state.train_losses.append(metrics["lm_loss"])
            throughput = tokens_per_step / elapsed
            self.state.tokens_per_second.append(throughput)
            flops_per_device = throughput * self.budget.train_flops_per_token / self.layout.world_size
            metrics.update(step_time_s=elapsed, tokens_per_second=throughput, tflops_per_device=flops_per_device / 1e12)
            if peak:
                metrics["mfu_percent"] = 100.0 * flops_per_device / peak
            logger.step(step, metrics)
            last = step == cfg.train.max_steps
            interval = cfg.logging.utilisation_interval
            logger.utilisation(step, routing.counts_per_pool, cfg.moe.pool_layout(cfg.model.num_layers),
                               image=last or (interval and step % interval == 0))
            if last:
                # saved before the final evaluation, as Megatron does: that evaluation (long over a large validation
                # set, and where a lost node is often first seen) must not cost the trained steps; a resume from
                # this checkpoint runs only the evaluation (after the loop)
                self.save()
            if last or (cfg.train.eval_interval and step % cfg.train.eval_interval == 0):
                self._record_evaluation(logger)
            saved = not last and cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0
            checkpoint = self.save() if saved else None  # after the evaluation: its loss is in the checkpoint
            if not last and stop_requested is not None and on_any_rank(stop_requested(), self.parallel):
                if not saved:  # every rank calls save, so every rank decides alike (the save above, or none)
                    checkpoint = self.save()
                logger.close()  # TensorBoard holds every step the checkpoint does: the rerun logs only later ones
                raise RunStopped(step, checkpoint)
        if not self._evaluated_at(self.state.step):
            self._record_evaluation(logger)  # resumed at (or past) max_steps: no step ran, so neither did this
        summary = self.summary()
        try:
            logger.close(summary)
        except OSError as error:  # a full disk, as a save would report it: one line, not a traceback
            raise CheckpointError(f"trained to step {self.state.step} (checkpoints saved as configured), but cannot"
                                  f" write {self.run_dir / 'summary.json'}: {os_error_text(error)}") from error
        return summary

    def _record_evaluation(self, logger: MetricsLogger) -> None:
        step, (loss, by_file) = self.state.step, self.evaluate()
        # a step evaluated again (a resume at the end that switched data.valid_per_file on or changed its files):
        # this evaluation is the step's, for what it evaluated
        for history in self._validation_histories(by_file):
            if history and history[-1][0] == step:
                history.pop()
        self.state.val_losses.append((step, loss))
        for name, file_loss in by_file.items():
            self.state.val_losses_by_file.setdefault(name, []).append((step, file_loss))
        logger.evaluation(step, loss, by_file)

    def _evaluated_at(self, step: int) -> bool:
        """Whether the state holds `step`'s validation, each file's included under data.valid_per_file (a resume
        that switched it on finds only the blend's)."""
        files = self.data.valid.names if self.config.data.valid_per_file else []
        return all(history and history[-1][0] == step for history in self._validation_histories(files))

    def _validation_histories(self, files) -> list[list[tuple[int, float]]]:
        """The validation losses, then those of each of `files` (empty for a file not evaluated yet)."""
        return [self.state.val_losses, *(self.state.val_losses_by_file.get(name, []) for name in files)]

    def summary(self) -> dict:
        s, b = self.state, self.budget
        warm_up = {1, *s.resumed_at_steps}  # the first step of each start and resume
        measured = [rate for step, rate in enumerate(s.tokens_per_second, start=1) if step not in warm_up]
        measured = measured or s.tokens_per_second
        return {
            "final_train_loss": s.train_losses[-1] if s.train_losses else None,
            "final_val_loss": s.val_losses[-1][1] if s.val_losses else None,
            "train_losses": s.train_losses,
            "val_losses": [list(v) for v in s.val_losses],
            # data.valid_per_file: each file's loss at the last validation and at each one, by prefix
            "final_val_loss_by_file": {name: losses[-1][1] for name, losses in s.val_losses_by_file.items()
                                       if s.val_losses and losses[-1][0] == s.val_losses[-1][0]},
            "val_losses_by_file": {name: [list(v) for v in losses] for name, losses in s.val_losses_by_file.items()},
            "vocab_size": self.config.model.vocab_size,
            "tokenizer_vocab_size": self.data.vocab_size,
            "total_params": b.total_params,
            "active_params": b.active_params,
            # tokens over time; every step has the same tokens, so the harmonic mean of the step rates
            "tokens_per_second": len(measured) / sum(1.0 / rate for rate in measured) if measured else None,
            "train_flops_per_token": b.train_flops_per_token,
            "steps": s.step,
            # skipped for a non-finite loss (null in summary.json's train_losses) or gradient norm (a finite loss)
            "skipped_steps": s.skipped_steps,
            "consumed_samples": s.consumed_samples,
            "config": config_to_dict(self.config),
        }
