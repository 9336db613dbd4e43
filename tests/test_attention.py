"""The attention sublayer (model/attention.py) against a plain PyTorch one: q, k and v each by its own
projection and RoPE applied to q and k one at a time, as the HF LLaMA layout defines them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_unipool.config import ModelConfig
from megatron_unipool.kernels import causal_attention
from megatron_unipool.model.attention import Attention
from megatron_unipool.model.rope import RotaryEmbedding
from test_kernels import attention_reference


def attention_layer(num_heads=4, num_kv_heads=2, **settings):
    config = ModelConfig(num_layers=1, hidden_size=32, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         ffn_hidden_size=64, vocab_size=16, seq_len=12, **settings)
    torch.manual_seed(0)
    rope = RotaryEmbedding(config.head_dim, config.seq_len, config.rope_base)
    return Attention(config, rope, output_std=0.02), rope


def rotate_half(x_BHSK, rope):
    """x cos + rotate_half(x) sin, with the tables' first S rows: [-x2, x1] (HF LLaMA's apply_rotary_pos_emb)."""
    s = x_BHSK.shape[2]
    first, second = x_BHSK.chunk(2, dim=-1)
    return x_BHSK * rope.cos[:s] + torch.cat([-second, first], dim=-1) * rope.sin[:s]


def reference_attention(layer, rope, x_BSD, core=attention_reference):
    b, s, _ = x_BSD.shape
    k_dim = layer.config.head_dim
    heads = lambda w: F.linear(x_BSD, w.weight).view(b, s, -1, k_dim).transpose(1, 2)  # noqa: E731
    q, k, v = rotate_half(heads(layer.wq), rope), rotate_half(heads(layer.wk), rope), heads(layer.wv)
    return F.linear(core(q, k, v).transpose(1, 2).reshape(b, s, -1), layer.wo.weight)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (4, 4), (4, 1)])
def test_attention_with_one_projection_for_q_k_and_v_equals_three(num_heads, num_kv_heads):
    """Output and every gradient (input, wq, wk, wv, wo) as with separate projections, for grouped,
    full and single key/value heads (the splits of the fused projection's output at each head count)."""
    layer, rope = attention_layer(num_heads, num_kv_heads)
    x = torch.randn(2, 12, 32, requires_grad=True)
    grad_out = torch.randn(2, 12, 32)
    results = []
    for forward in (layer, lambda x_: reference_attention(layer, rope, x_)):
        layer.zero_grad()
        x.grad = None
        out = forward(x)
        out.backward(grad_out)
        results.append([out, x.grad] + [w.weight.grad.clone() for w in (layer.wq, layer.wk, layer.wv, layer.wo)])
    for name, got, want in zip(["out", "x", "wq", "wk", "wv", "wo"], *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def saved_bytes(forward) -> int:
    """Bytes of the distinct storages autograd keeps for backward of `forward()`."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def test_the_fused_projection_keeps_no_more_for_backward_than_three():
    """v is copied out of the fused output: as a view it would keep q and k before RoPE alive until backward.
    Both with the model's attention kernel."""
    layer, rope = attention_layer()
    x = torch.randn(2, 12, 32, requires_grad=True)
    fused = saved_bytes(lambda: layer(x))
    separate = saved_bytes(lambda: reference_attention(layer, rope, x, core=causal_attention))
    assert fused <= separate, (fused, separate)
