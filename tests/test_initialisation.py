"""Initialisation: Megatron's scaled init. Every matrix is N(0, init_std) except the projections
that write into the residual stream (attention output, FFN and expert down projections), which
are N(0, init_std / sqrt(2 * num_layers)); norm weights and the NormRouter scale start at one."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_unipool.config import load_config
from megatron_unipool.model import LanguageModel

RESIDUAL_WRITERS = ("attention.wo.weight", "w_down", "w_down.weight")
ONES = ("norm.weight", "router.scale")


def expected_std(name: str, init_std: float, num_layers: int) -> float:
    if name.endswith(ONES):
        return 0.0
    if name.endswith(RESIDUAL_WRITERS):
        return init_std / math.sqrt(2 * num_layers)
    return init_std


@pytest.mark.parametrize("config_file, overrides", [
    ("configs/tiny_dense_cpu.json", []),
    ("configs/tiny_vanilla_cpu.json", ["moe.shared_expert_ffn_hidden_size=64"]),
    ("configs/tiny_unipool_cpu.json", ["moe.router=norm", "model.num_layers=6"]),
])
def test_every_parameter_starts_at_its_scaled_normal(config_file, overrides):
    # 0.01, far from torch's default for nn.Linear (uniform, std 1 / sqrt(3 * fan_in): 0.051 at 128 inputs), so a
    # matrix left at that default fails
    config = load_config(config_file, ["model.init_std=0.01"] + overrides)
    torch.manual_seed(0)
    model = LanguageModel(config.model, config.moe)
    seen = set()
    for name, param in model.named_parameters():
        std = expected_std(name, config.model.init_std, config.model.num_layers)
        values = param.detach().double()
        if std == 0.0:
            assert torch.equal(values, torch.ones_like(values)), name
            continue
        seen.add(name.removesuffix(".weight").rsplit(".", 1)[-1])
        # >= 8192 samples: the sample std is within 1% of the true one (1 sigma), the mean within 0.02 std
        assert values.std().item() == pytest.approx(std, rel=0.05), name
        assert abs(values.mean().item()) < 0.1 * std, name
        kurtosis = ((values - values.mean()) ** 4).mean() / values.var(unbiased=False) ** 2
        assert abs(kurtosis.item() - 3.0) < 0.5, name  # normal, not uniform (1.8)
    assert {"embedding", "wq", "wo", "w_down", "output"} <= seen
