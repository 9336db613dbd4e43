"""Each Triton kernel against the eager PyTorch ops it replaces, forward + backward, in one run:
the language-model loss (`cross_entropy`), RoPE (`rotary`), the SwiGLU activation (`swiglu`) and the
MoE permute and combine (`permute`: tokens into the experts' layout and the gate-weighted rows back,
top-1 over 8 experts, with the experts left out; the Triton side writes the rows padded as the CUDA
grouped GEMM takes them, the torch side unpadded, where the model's experts pad them in further copies).

    python benchmarks/triton_kernels.py [--kernels cross_entropy rotary swiglu permute] [--tokens 8192 32768] [--json out.json]

Shapes follow the 182M models at `--tokens` tokens per micro-batch: logits over a `--vocab` of
51,200, queries of 12 heads of 64, an FFN width of 3072. `GB/s` counts the least traffic any
implementation needs (the inputs read and the results written once each way, in the inputs' dtype):
the loss 3 x tokens x vocab elements (logits read twice, gradient written once), RoPE 4 x its input,
SwiGLU 8 x one activation (gate and up read and the product written forward; the gradient, gate and
up read and two gradients written backward), the permute and combine 9 x tokens x hidden at top-1 (the
permute's rows read and written each way: 4; the combine's expert outputs read and token rows written
forward, output gradient and expert outputs read and their gradient written backward: 5). The kernels
run on CUDA, or on a CPU in Triton's
interpreter when TRITON_INTERPRET=1 is set (slow: only to check the plumbing); where neither can run,
the script says so and measures nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_unipool  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from megatron_unipool.kernels import cross_entropy_sum, rotary, swiglu_activation  # noqa: E402
from megatron_unipool.kernels.triton_support import triton_runs_on  # noqa: E402
from megatron_unipool.model.rope import RotaryEmbedding  # noqa: E402
from megatron_unipool.kernels.grouped_gemm import expert_row_alignment  # noqa: E402
from megatron_unipool.moe.dispatch import expert_rows, permute, plan_dispatch, unpermute  # noqa: E402
from megatron_unipool.training.hardware import device_name  # noqa: E402
from measurement import (add_measurement_arguments, compute_dtype, measure_row, print_table,  # noqa: E402
                         time_forward_backward)


def workload(kernel: str, tokens: int, args, device, dtype):
    """(forward of one input tensor for `impl`, that input, other tensors needing gradients, shape label,
    elements of least traffic)."""
    generator = torch.Generator(device).manual_seed(0)  # on the device: 32768 x 51200 logits took ~10-20 s on a host

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, device=device).mul_(2).to(dtype)

    if kernel == "cross_entropy":
        targets = torch.randint(0, args.vocab, (tokens,), generator=generator, device=device)
        return (lambda impl: lambda x: cross_entropy_sum(x, targets, impl)), tensor(tokens, args.vocab), [], \
            f"{tokens}x{args.vocab}", 3 * tokens * args.vocab
    if kernel == "rotary":
        sequences = max(1, tokens // args.seq_len)
        rope = RotaryEmbedding(args.head_dim, args.seq_len, 10000.0).to(device)
        x = tensor(sequences, args.seq_len, args.heads, args.head_dim)
        return (lambda impl: lambda t: rotary(t, rope.cos, rope.sin, impl)), x, [], \
            f"{sequences}x{args.seq_len}x{args.heads}x{args.head_dim}", 4 * x.numel()
    if kernel == "permute":
        plan = plan_dispatch(torch.randint(0, 8, (tokens, 1), generator=generator, device=device), 8, None)
        gates = torch.rand(tokens, 1, generator=generator, device=device).requires_grad_()
        # the layout the model's experts take (padded for torch._grouped_mm on CUDA), experts of the 182M shape
        expert_weight = torch.empty(8, args.ffn, args.hidden, device="meta")
        align = expert_row_alignment("auto", dtype, device, expert_weight, expert_weight.transpose(-2, -1))

        def round_trip(impl):
            rows = expert_rows(plan, tokens, 1, align) if impl == "triton" else None
            return lambda x: unpermute(permute(x, plan, dtype, rows), gates, plan, tokens, rows)
        return round_trip, tensor(tokens, args.hidden), [gates], f"{tokens}x{args.hidden}", 9 * tokens * args.hidden
    up = tensor(tokens, args.ffn).requires_grad_()  # both inputs get gradients, as in the model
    return (lambda impl: lambda gate: swiglu_activation(gate, up, impl)), tensor(tokens, args.ffn), [up], \
        f"{tokens}x{args.ffn}", 8 * up.numel()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", choices=["cross_entropy", "rotary", "swiglu", "permute"],
                        default=["cross_entropy", "rotary", "swiglu", "permute"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="tokens per micro-batch")
    parser.add_argument("--vocab", type=int, default=51200)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=3072, help="FFN width")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size (the permuted rows)")
    add_measurement_arguments(parser, repeats=10, warmup=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_label = device_name()
    dtype = compute_dtype(args.dtype, device)
    if not triton_runs_on(device):  # the eager rows alone compare nothing (and 32768 x 51200 fp32 logits fill a host)
        parser.error("Triton cannot run here (not installed, or no CUDA device): nothing to compare the eager ops"
                     " with; on a CPU, TRITON_INTERPRET=1 runs the kernels in Triton's interpreter (slow: use small"
                     " --tokens and --vocab)")
    impls = ["torch", "triton"]
    results = []
    for kernel in args.kernels:
        for tokens in args.tokens:
            forward_of, x, others, shape, least_elements = workload(kernel, tokens, args, device, dtype)
            for impl in impls:
                row = {"kernel": kernel, "tokens": tokens, "shape": shape, "impl": impl,
                       "dtype": str(dtype).removeprefix("torch."), "device": device_label}
                least_bytes = least_elements * dtype.itemsize
                measure_row(results, row, f"{kernel:13s} {impl:6s} {shape}",
                            lambda forward=forward_of(impl), x=x, others=others: time_forward_backward(
                                forward, others, x.clone().requires_grad_(), args.repeats, args.warmup),
                            lambda seconds, least_bytes=least_bytes: {"ms": 1e3 * seconds,
                                                                      "gb_per_s": least_bytes / seconds / 1e9},
                            args.json)
    for row in results:
        twin = next((r for r in results if r["impl"] == "torch" and r["kernel"] == row["kernel"]
                     and r["tokens"] == row["tokens"] and "error" not in r), None)
        if "error" not in row:
            row["speedup_vs_torch"] = twin["ms"] / row["ms"] if twin else None
    print(f"Triton kernels vs eager PyTorch, forward+backward, on {device_label}, {str(dtype).removeprefix('torch.')}")
    print_table(results, [("kernel", "kernel", 13, ""), ("shape", "shape", 18, ""), ("impl", "impl", 6, ""),
                          ("ms", "ms", 9, "{:.3f}"), ("GB/s", "gb_per_s", 8, "{:.1f}"),
                          ("vs torch", "speedup_vs_torch", 9, "{:.2f}x")])
    if args.json:  # again, with the ratios
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
