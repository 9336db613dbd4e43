"""The training loop on one process: gradient accumulation, balancing-statistics bookkeeping,
evaluation, logging and checkpoints.

Loss normalisation follows the layout-invariance rules of the design note: the LM loss is the
sum of token losses divided by the tokens of the whole global batch, and each micro-batch's MoE
losses are averaged over the micro-batches of the step.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config, config_to_dict
from ..model import LanguageModel, param_budget
from .checkpoint import latest_checkpoint, load_checkpoint, restore_model, rng_state, save_checkpoint, set_rng_state
from .datasets import RunData, build_datasets
from .hardware import peak_flops
from .metrics import MetricsLogger
from .optimizer import build_optimizer, learning_rate, set_learning_rate


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs."""

    step: int = 0
    consumed_samples: int = 0
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_second: list[float] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(config: Config, device: torch.device):
    if config.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss_sum(model: LanguageModel, batch: torch.Tensor, config: Config, device: torch.device):
    """(sum of next-token losses, MoE losses) of one micro-batch [B, S + 1]."""
    batch = batch.to(device)
    with autocast(config, device):
        logits, moe_losses = model(batch[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
    return loss, moe_losses


@torch.no_grad()
def evaluate(model: LanguageModel, data: RunData, config: Config, device: torch.device) -> float:
    """Mean token loss over `eval_batches` micro-batches of samples spread evenly over the validation
    split (its first samples alone would be one play's cast list)."""
    model.eval()
    micro = config.train.micro_batch
    count = min(config.train.eval_batches * micro, len(data.valid))
    positions = np.linspace(0, len(data.valid) - 1, count).round().astype(np.int64)
    total, tokens = 0.0, 0
    for start in range(0, count, micro):
        batch = torch.from_numpy(np.stack([data.valid.sample(int(g)) for g in positions[start : start + micro]]))
        loss, _ = lm_loss_sum(model, batch, config, device)
        total += loss.item()
        tokens += batch[:, 1:].numel()
    model.train()
    return total / tokens


def train_step(model, optimizer, data: RunData, state: TrainState, config: Config, device):
    """One optimizer step over the global batch: (metrics, the step's routing statistics)."""
    train = config.train
    accumulation = train.global_batch // train.micro_batch
    global_tokens = train.global_batch * config.model.seq_len
    lr = learning_rate(state.step, train)
    set_learning_rate(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    lm_total, moe_totals = 0.0, {}
    for micro in range(accumulation):
        batch = data.train.batch(state.consumed_samples + micro * train.micro_batch, train.micro_batch)
        lm_sum, moe_losses = lm_loss_sum(model, batch, config, device)
        loss = lm_sum / global_tokens + sum(moe_losses.values(), torch.zeros((), device=device)) / accumulation
        loss.backward()
        model.end_micro_batch()
        lm_total += lm_sum.item() / global_tokens
        for name, value in moe_losses.items():
            moe_totals[name] = moe_totals.get(name, 0.0) + value.item() / accumulation
    max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    optimizer.step()
    routing = model.end_optimizer_step()
    state.step += 1
    state.consumed_samples += train.global_batch
    routed = sum(int(c.sum()) for c in routing.counts_per_pool)
    metrics = {"lr": lr, "lm_loss": lm_total, "grad_norm": grad_norm, **moe_totals}
    if routed:
        metrics["dropped_fraction"] = routing.dropped / routed
    return metrics, routing


class Trainer:
    def __init__(self, config: Config, run_dir: str | Path, device: Optional[torch.device] = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        seed_everything(config.train.seed)
        self.data = build_datasets(config)
        self.model = LanguageModel(config.model, config.moe).to(self.device)
        self.optimizer = build_optimizer(self.model, config.train)
        self.budget = param_budget(config.model, config.moe)
        self.state = TrainState()
        self.checkpoints = self.run_dir / "checkpoints"
        self._resume()

    def _resume(self) -> None:
        ckpt = self.config.checkpoint
        path = Path(ckpt.load) if ckpt.load else (latest_checkpoint(self.checkpoints) if ckpt.resume else None)
        if path is None:
            return
        payload = load_checkpoint(path)
        restore_model(self.model, payload["model"], path)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state = TrainState(**payload["train_state"])
        set_rng_state(payload["rng"])
        print(f"resumed from {path} at step {self.state.step} ({self.state.consumed_samples} samples)", flush=True)

    def save(self) -> Path:
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_state": asdict(self.state),
            "rng": rng_state(),
            "config": config_to_dict(self.config),
        }
        return save_checkpoint(self.checkpoints, self.state.step, payload, self.config.checkpoint.keep_last)

    def train(self) -> dict:
        cfg = self.config
        logger = MetricsLogger(self.run_dir, cfg.logging, cfg.train.max_steps)
        peak = peak_flops()
        tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
        print(f"training {cfg.moe.kind} model: {self.budget.total_params:,} parameters, "
              f"{self.budget.active_params:,} active per token, {len(self.data.train):,} training samples of "
              f"{cfg.model.seq_len} tokens; run directory {self.run_dir}", flush=True)
        while self.state.step < cfg.train.max_steps:
            started = time.perf_counter()
            metrics, routing = train_step(self.model, self.optimizer, self.data, self.state, cfg, self.device)
            elapsed = time.perf_counter() - started
            step = self.state.step
            self.state.train_losses.append(metrics["lm_loss"])
            throughput = tokens_per_step / elapsed
            self.state.tokens_per_second.append(throughput)
            metrics.update(step_time_s=elapsed, tokens_per_second=throughput,
                           tflops=throughput * self.budget.train_flops_per_token / 1e12)
            if peak:
                metrics["mfu_percent"] = 100.0 * throughput * self.budget.train_flops_per_token / peak
            logger.step(step, metrics)
            last = step == cfg.train.max_steps
            interval = cfg.logging.utilisation_interval
            logger.utilisation(step, routing.counts_per_pool, image=last or (interval and step % interval == 0))
            if last or (cfg.train.eval_interval and step % cfg.train.eval_interval == 0):
                self.state.val_losses.append((step, evaluate(self.model, self.data, cfg, self.device)))
                logger.evaluation(step, self.state.val_losses[-1][1])
            if last or (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0):
                self.save()
        summary = self.summary()
        logger.close(summary)
        return summary

    def summary(self) -> dict:
        s, b = self.state, self.budget
        measured = s.tokens_per_second[1:] or s.tokens_per_second  # the first step includes warm-up
        return {
            "final_train_loss": s.train_losses[-1] if s.train_losses else None,
            "final_val_loss": s.val_losses[-1][1] if s.val_losses else None,
            "train_losses": s.train_losses,
            "val_losses": [list(v) for v in s.val_losses],
            "vocab_size": self.config.model.vocab_size,
            "tokenizer_vocab_size": self.data.vocab_size,
            "total_params": b.total_params,
            "active_params": b.active_params,
            "tokens_per_second": sum(measured) / len(measured) if measured else None,
            "train_flops_per_token": b.train_flops_per_token,
            "steps": s.step,
            "consumed_samples": s.consumed_samples,
            "config": config_to_dict(self.config),
        }
