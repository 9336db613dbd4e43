"""Routing probe: how much does each layer's learned routing matter?

One layer's router is replaced by a uniformly random choice of k experts per token, drawn from the
whole pool or from the experts that layer uses most, and the validation loss and next-token accuracy are
measured again.
The random choice keeps the size of the layer's output: its k gates are each 1/k of the sum of
the gates the learned router gave that token. A large loss increase says the layer relies on
which experts it picks; a small one says any experts (of that set) would do.
"""
from __future__ import annotations

import argparse
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn

from ..config import Config
from ..model import LanguageModel, MoELayer, Routing, lm_loss_sum
from .checkpoint import load_trained_model
from .datasets import build_datasets, validation_batches
from .outputs import check_output_directory


class RandomRouting(nn.Module):
    """Wraps a layer's router: same gate mass, uniformly random experts from `candidates`."""

    def __init__(self, router: nn.Module, candidates: torch.Tensor, generator: torch.Generator):
        super().__init__()
        self.router, self.candidates, self.generator = router, candidates, generator

    def forward(self, x_TD: torch.Tensor, logit_offset_M: Optional[torch.Tensor] = None) -> Routing:
        learned = self.router(x_TD, logit_offset_M)
        tokens, k = learned.indices_TK.shape
        weights = torch.ones(tokens, len(self.candidates))
        picks = torch.multinomial(weights, k, replacement=False, generator=self.generator)
        indices = self.candidates[picks].to(x_TD.device)
        gates = learned.gates_TK.sum(-1, keepdim=True).expand(tokens, k) / k
        # a token the learned router sent nowhere (NormRouter) goes nowhere: under a capacity factor its
        # weightless random slots would take other tokens' places
        active = None if learned.active_TK is None else learned.active_TK.any(-1, keepdim=True).expand(tokens, k)
        return Routing(indices, gates.contiguous(), learned.scores_TM, learned.logits_TM, active)


@contextlib.contextmanager
def random_routing(layer: MoELayer, candidates: torch.Tensor, seed: int) -> Iterator[None]:
    router = layer.router
    layer.router = RandomRouting(router, candidates, torch.Generator().manual_seed(seed))
    try:
        yield
    finally:
        layer.router = router


class Scores(NamedTuple):
    loss: float  # mean token LM loss
    accuracy: float  # share of the tokens whose most likely next id is the one that follows


@torch.no_grad()
def next_token_scores(model: LanguageModel, batches: list[torch.Tensor], eod_id: Optional[int] = None,
                      progress: Optional[Callable[[int], None]] = None) -> Scores:
    """Mean token LM loss and next-token accuracy over the batches (each [B, S+1]), computed on the model's device;
    `eod_id`: the data's end-of-document id, which model.document_masking needs to keep attention within
    documents as training did. `progress(batches done)` after each batch."""
    model.eval()
    device = model.embedding.weight.device
    loss, correct, count = 0.0, 0, 0
    for done, batch in enumerate(batches, start=1):
        batch = batch.to(device)
        logits, _ = model(batch[:, :-1], model.documents_of(batch[:, :-1], eod_id))
        targets = batch[:, 1:].flatten()
        loss += lm_loss_sum(logits.flatten(0, 1).float(), targets).item()
        correct += int((logits.flatten(0, 1).argmax(dim=-1) == targets).sum())
        count += targets.numel()
        if progress is not None:
            progress(done)
    return Scores(loss / count, correct / count)


def add_routed_run_arguments(parser: argparse.ArgumentParser, output: str, writes: str) -> None:
    """The routing tools' common options: the run, its validation batches, the output directory (default
    ./`output`, holding `writes`), and --device and --precision (a large model's validation passes take
    minutes a layer on a CPU)."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="run directory or step_* directory")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="validation batches of train.global_batch sequences (default: the run's train.eval_batches)")
    parser.add_argument("--output", type=Path, default=Path(output),
                        help=f"directory for {writes} (default: ./{output}, replaced per file)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where there is one)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the forward passes under bf16 autocast, as training computes them")


def analysis_device(name: str) -> torch.device:
    """--device checked: one this machine lacks is a ValueError saying so, before any work."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def analysis_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast the routing tools' passes run under (none for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def open_routed_run(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    why: str) -> tuple[torch.device, Path, Config, LanguageModel]:
    """(device, checkpoint path, config, model) for add_routed_run_arguments' options, each checked before
    the minutes of loading; `why` says what a dense model lacks."""
    if args.eval_batches is not None and args.eval_batches < 1:  # 0 would silently mean the run's default
        parser.error(f"--eval-batches must be at least 1, not {args.eval_batches}")
    device = analysis_device(args.device)
    check_output_directory(args.output, f"--output {args.output}")
    print(f"loading {args.checkpoint} ...", flush=True)
    return (device, *load_routed_model(args.checkpoint, why, device))


def load_routed_model(checkpoint: Path, why: str, device: torch.device | str = "cpu") -> tuple[Path, Config, LanguageModel]:
    """(checkpoint path, config, model on `device`) of a trained MoE run for the routing tools; a dense one
    is a ValueError saying `why` they need experts."""
    path, _, config, model = load_trained_model(checkpoint)
    if config.moe.kind == "dense":
        raise ValueError(f"the checkpoint is a dense model: {why}")
    return path, config, model.to(device)


def routing_batches(config: Config, eval_batches: Optional[int] = None) -> tuple[list[torch.Tensor], int]:
    """The run's validation sequences (`eval_batches` global batches of them, default the run's) and the data's
    end-of-document id, read after the tools have checked their other arguments against the config."""
    train, data = config.train, build_datasets(config)
    sequences = (eval_batches or train.eval_batches) * train.global_batch
    return validation_batches(data.valid, train.micro_batch, sequences), data.eod_id


@torch.no_grad()
def record_routing(model: LanguageModel, batches: list[torch.Tensor], eod_id: Optional[int] = None
                   ) -> tuple[Scores, dict[int, torch.Tensor]]:
    """(next_token_scores, the experts each MoE layer picks for every token: {layer: [tokens, k]}), one pass."""
    picked: dict[int, list[torch.Tensor]] = {}
    handles = []
    for index in model.local_layers:
        layer = model.layers[index].ffn
        if isinstance(layer, MoELayer):
            picked[index] = []

            def record(module, inputs, routing, index=index):
                indices = routing.indices_TK
                if routing.active_TK is not None:  # slots NormRouter leaves empty pick no expert
                    indices = torch.where(routing.active_TK, indices, -1)
                picked[index].append(indices.cpu())

            handles.append(layer.router.register_forward_hook(record))
    try:
        scores = next_token_scores(model, batches, eod_id)
    finally:
        for handle in handles:
            handle.remove()
    return scores, {index: torch.cat(chunks) for index, chunks in picked.items()}


def unique_experts_by_depth(routing: dict[int, torch.Tensor], pool_of_layer: dict[int, int],
                            experts_per_pool: int) -> list[float]:
    """Mean number of distinct experts (pool, expert) a token has visited after each MoE layer."""
    layers = sorted(routing)
    pools = max(pool_of_layer.values()) + 1
    visited = torch.zeros(routing[layers[0]].shape[0], pools * experts_per_pool + 1, dtype=torch.bool)
    curve = []
    for layer in layers:
        indices = routing[layer]
        slot = torch.where(indices >= 0, pool_of_layer[layer] * experts_per_pool + indices, visited.shape[1] - 1)
        visited.scatter_(1, slot, True)
        curve.append(visited[:, :-1].sum(1).double().mean().item())  # the last column collects empty slots
    return curve


def most_used_experts(picks_TK: torch.Tensor, num_experts: int, n: int) -> torch.Tensor:
    """The n experts a layer picked most often, ties to the lower index; empty slots (-1) count for none."""
    usage = torch.bincount(picks_TK[picks_TK >= 0], minlength=num_experts)
    return torch.argsort(usage, descending=True, stable=True)[:n]


@dataclass
class ProbeRow:
    layer: int
    candidates: str  # "pool" or "top<N>"
    loss: float
    delta: float  # loss minus the learned routing's loss
    accuracy: float  # next-token accuracy (a share)
    accuracy_delta: float  # accuracy minus the learned routing's


def probe(model: LanguageModel, batches: list[torch.Tensor], layers: list[int], top_n: Optional[int],
          seeds: int = 1, progress: Optional[Callable[[int, int], None]] = None,
          eod_id: Optional[int] = None) -> tuple[Scores, list[ProbeRow]]:
    """(the learned routing's scores, one row per layer and candidate set), each row's loss and accuracy averaged
    over `seeds` draws (`eod_id`: as next_token_scores's).
    No top-N set when N covers the pool: it would repeat the pool row. `progress(done, total)` after the
    learned routing's pass (done 0) and after each layer (a probe of a large model takes minutes per layer)."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, not {seeds}")
    baseline, routing = record_routing(model, batches, eod_id)  # the learned routing's loss and choices, one pass
    if progress is not None:
        progress(0, len(layers))
    rows = []
    for done, index in enumerate(layers, 1):
        layer = model.layers[index].ffn
        if not isinstance(layer, MoELayer):
            raise ValueError(f"layer {index} is not an MoE layer")
        candidate_sets = {"pool": torch.arange(layer.pool.num_experts)}
        if top_n and top_n < layer.pool.num_experts:
            candidate_sets[f"top{top_n}"] = most_used_experts(routing[index], layer.pool.num_experts, top_n)
        for name, candidates in candidate_sets.items():
            draws = []
            for seed in range(seeds):
                with random_routing(layer, candidates, seed):
                    draws.append(next_token_scores(model, batches, eod_id))
            loss, accuracy = (sum(values) / seeds for values in zip(*draws))
            rows.append(ProbeRow(index, name, loss, loss - baseline.loss, accuracy, accuracy - baseline.accuracy))
        if progress is not None:
            progress(done, len(layers))
    return baseline, rows
