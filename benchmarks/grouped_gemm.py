"""Expert GEMMs alone: the grouped SwiGLU over tokens sorted by expert against one dense SwiGLU of
the same FLOPs (all rows through one expert-sized FFN), forward + backward, in one run.

    python benchmarks/grouped_gemm.py [--rows 8192 32768] [--experts 8 64] [--layers 1] [--json out.json]

This isolates the kernels from routing and permutation: the target "grouped expert GEMMs reach
>= 70% of the dense GEMM rate at equal FLOPs" (docs/benchmarks.md) is the `vs dense` column, dense
being the same SwiGLU as three plain torch GEMMs (F.linear) over all rows.
Rows are routed token slots (tokens x top-k); `--balance skewed` gives the experts Zipf-like
loads (as early in training), `uniform` equal ones. Each backend of kernels.grouped_swiglu that
this device supports is measured (grouped_mm needs 16-byte-aligned widths, and bf16 on CUDA).
FLOPs: 3 GEMMs of 2*rows*hidden*ffn forward, twice that backward.

With one layer, dense, grouped_mm and triton are also timed in two parts, each a third of the FLOPs: the
forward alone (`fwd`) and the weight gradients alone (`wgrad`: the three GEMMs that contract over each
expert's rows, on random operands of their shapes, rows padded as on CUDA); the rest of a forward +
backward is the input gradient and the activation's backward. Where few rows reach each expert this
says which GEMMs lose the rate.

`triton` is model.expert_gemm='triton' (kernels.rows_gemm for the forward and input gradients,
kernels.segmented_gemm for the weight gradients), measured where Triton runs (on a CPU only with
TRITON_INTERPRET=1, slowly).

`--layers L` makes the experts a pool that L layers call in turn, `--rows` each (UniPool's case): their
weight gradients are deferred to one pass over every layer's rows (kernels.DeferredWeightGradients),
whose grouped_mm variants are `grouped_mm` (rows regrouped for torch._grouped_mm) and
`grouped_mm+wgrad_triton` (kernels.segmented_gemm reading them in place; needs Triton, as `triton`
does, whose deferred weight gradients are that kernel's too). Dense then runs all L x rows through one
FFN.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_unipool  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from megatron_unipool.kernels.grouped_gemm import (DeferredWeightGradients, expert_offsets,  # noqa: E402
                                                  expert_row_alignment, grouped_mm_supported, grouped_swiglu,
                                                  grouped_weight_gradients, padded_rows, WEIGHT_GRADIENT_OPERANDS)
from megatron_unipool.kernels.segmented_gemm import segmented_weight_gradient  # noqa: E402
from megatron_unipool.kernels.triton_support import triton_runs_on  # noqa: E402
from megatron_unipool.training.hardware import device_name  # noqa: E402
from measurement import (add_measurement_arguments, add_ratios, compute_dtype, error_text,  # noqa: E402
                         measure_row, median_seconds, print_table, time_forward_backward)


def expert_counts(rows: int, experts: int, balance: str, seed: int = 0) -> list[int]:
    if balance == "uniform":
        return [rows // experts + (e < rows % experts) for e in range(experts)]
    weights = 1.0 / np.arange(1, experts + 1) ** 0.8
    return np.random.default_rng(seed).multinomial(rows, weights / weights.sum()).tolist()


def weights(experts: int, hidden: int, ffn: int, device, dtype) -> list[torch.Tensor]:
    shapes = [(experts, ffn, hidden), (experts, ffn, hidden), (experts, hidden, ffn)]
    return [(torch.randn(s, device=device, dtype=dtype) * 0.02).requires_grad_() for s in shapes]


WGRAD_TRITON = "+wgrad_triton"  # impl suffix: the deferred pool gradients through kernels.segmented_gemm


def measure(impl: str, rows: int, experts: int, args, device, dtype) -> float:
    """Median seconds of forward + backward (of every layer's call, with --layers)."""
    torch.manual_seed(0)
    x = torch.randn(args.layers * rows, args.hidden, device=device, dtype=dtype, requires_grad=True)
    if impl == "dense":  # plain torch GEMMs through autograd: the rate a dense FFN of these FLOPs gets
        # leaves of their own: views of [1, F, D] tensors would add a select's backward (a zero fill and a copy)
        params = [w[0].detach().requires_grad_() for w in weights(1, args.hidden, args.ffn, device, dtype)]
        gate, up, down = params
        forward = (lambda x: F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down))
    else:
        params = weights(experts, args.hidden, args.ffn, device, dtype)
        counts = torch.tensor(expert_counts(rows, experts, args.balance), device=device)
        backend = impl.removesuffix(WGRAD_TRITON)
        wgrad = "triton" if impl.endswith(WGRAD_TRITON) or backend == "triton" else "torch"

        def forward(x):
            if args.layers == 1:
                return grouped_swiglu(x, counts, *params, backend=backend)
            deferred = DeferredWeightGradients(wgrad)
            calls = deferred.attach(x, *params).chunk(args.layers)
            return torch.cat([grouped_swiglu(call, counts, *params, backend=backend, deferred=deferred) for call in calls])
    return time_forward_backward(forward, params, x, args.repeats, args.warmup)


PHASED = ("dense", "grouped_mm", "triton")  # the implementations timed in parts (with one layer)


def phase_seconds(impl: str, rows: int, experts: int, args, device, dtype) -> tuple[float, float]:
    """(forward alone, the three weight-gradient GEMMs alone): median seconds, as the module docstring says."""
    torch.manual_seed(0)
    # the weight-gradient operands, in grouped_weight_gradients' order: x, grad_gate, grad_up, hidden, grad_out
    widths = (args.hidden, args.ffn, args.ffn, args.ffn, args.hidden)
    if impl == "dense":
        gate, up, down = (w[0].detach() for w in weights(1, args.hidden, args.ffn, device, dtype))
        forward = (lambda x: F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down))
        operands = [torch.randn(rows, width, device=device, dtype=dtype) for width in widths]

        def wgrad():
            return [operands[g].t() @ operands[i] for g, i in WEIGHT_GRADIENT_OPERANDS]
    else:
        params = [w.detach() for w in weights(experts, args.hidden, args.ffn, device, dtype)]
        counts = torch.tensor(expert_counts(rows, experts, args.balance), device=device)
        forward = (lambda x: grouped_swiglu(x, counts, *params, backend=impl))
        # the rows as the expert GEMM lays them out (padded for torch._grouped_mm on CUDA)
        align = expert_row_alignment(impl, dtype, device, params[0], params[2])
        _, padded_counts, padded = padded_rows(counts, align, rows)
        operands = [torch.randn(padded, width, device=device, dtype=dtype) for width in widths]

        def wgrad():
            if impl == "triton":  # unpadded rows, read in place
                return [segmented_weight_gradient([operands[g]], [operands[i]], counts[None])
                        for g, i in WEIGHT_GRADIENT_OPERANDS]
            return grouped_weight_gradients(expert_offsets(padded_counts), *operands)
    x = torch.randn(rows, args.hidden, device=device, dtype=dtype)
    with torch.no_grad():
        return (median_seconds(lambda: forward(x), args.repeats, args.warmup, device),
                median_seconds(wgrad, args.repeats, args.warmup, device))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8192, 32768], help="routed token slots")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=512, help="expert width")
    parser.add_argument("--balance", choices=["uniform", "skewed"], default="uniform")
    parser.add_argument("--layers", type=int, default=1, help="layers sharing the experts, --rows each")
    add_measurement_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_label = device_name()
    dtype = compute_dtype(args.dtype, device)
    probe = torch.empty(1, args.hidden, device=device, dtype=dtype)
    supported, triton = (grouped_mm_supported(dtype, device, *weights(1, args.hidden, args.ffn, device, dtype)),
                         triton_runs_on(probe))
    impls = ["dense", "loop"] + (["grouped_mm"] if supported else [])
    impls += (["grouped_mm" + WGRAD_TRITON] if supported and triton and args.layers > 1 else []) + (["triton"] if triton else [])
    if not supported:
        print("  grouped_mm not measured: torch._grouped_mm missing or these widths/dtype unsupported here",
              file=sys.stderr)
    if not triton:
        print("  triton (and grouped_mm+wgrad_triton) not measured: no Triton, or no CUDA device (TRITON_INTERPRET=1"
              " runs it on a CPU)", file=sys.stderr)
    results = []
    flops_per_row = 18 * args.hidden * args.ffn
    for experts in args.experts:
        for rows in args.rows:
            for impl in impls:
                row = {"impl": impl, "rows": rows, "layers": args.layers, "experts": experts, "hidden": args.hidden,
                       "ffn": args.ffn, "balance": args.balance, "dtype": str(dtype).removeprefix("torch."),
                       "device": device_label}
                measure_row(results, row, f"{impl:23s} rows {rows:6d} experts {experts:3d}",
                            lambda impl=impl, rows=rows, experts=experts: measure(impl, rows, experts, args, device, dtype),
                            lambda seconds, rows=rows: {"ms": 1e3 * seconds,
                                                        "tflops": flops_per_row * args.layers * rows / seconds / 1e12},
                            args.json)
                if args.layers == 1 and impl in PHASED and "error" not in row:
                    try:  # as measure_row: a part that fails (out of memory, a kernel refusing a shape) ends no run
                        forward_s, wgrad_s = phase_seconds(impl, rows, experts, args, device, dtype)
                    except Exception as error:
                        row["phase_error"] = error_text(error)
                        print(f"  failed   {impl} fwd/wgrad parts: {row['phase_error']}", file=sys.stderr, flush=True)
                    else:
                        third = flops_per_row * rows / 3  # of a forward + backward's FLOPs: each part's
                        row.update(fwd_ms=1e3 * forward_s, fwd_tflops=third / forward_s / 1e12,
                                   wgrad_ms=1e3 * wgrad_s, wgrad_tflops=third / wgrad_s / 1e12)
                    if args.json:  # the parts too, before the next shape: a step cut at its limit keeps them
                        args.json.write_text(json.dumps(results, indent=2))
    shared = f", a pool shared by {args.layers} layers of --rows each" if args.layers > 1 else ""
    print(f"expert SwiGLU forward+backward on {device_label}: d={args.hidden}, expert width {args.ffn}, "
          f"{str(dtype).removeprefix('torch.')}, {args.balance} loads{shared}")
    add_ratios(results, "dense", "rows", "tflops", "vs_dense")
    print_table(results, [("experts", "experts", 7, ""), ("rows", "rows", 7, ""), ("impl", "impl", 23, ""),
                          ("ms", "ms", 9, "{:.2f}"), ("TFLOP/s", "tflops", 9, "{:.3f}"), ("vs dense", "vs_dense", 9, "{:.0%}"),
                          ("fwd TFLOP/s", "fwd_tflops", 12, "{:.3f}"), ("wgrad TFLOP/s", "wgrad_tflops", 14, "{:.3f}")])
    if args.json:  # again, with the ratios
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
