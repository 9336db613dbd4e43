"""The language-model loss alone: forward + backward of the cross-entropy over [rows, vocab] logits,
F.cross_entropy over the logits upcast to fp32 (`torch`, what the trainer did before) against the
Triton kernel (`triton`), in one run.

    python benchmarks/cross_entropy.py [--rows 8192 32768] [--vocab 51200] [--json out.json]

Rows are tokens per micro-batch (micro-batch x sequence length). `GB/s` counts the least traffic
any implementation needs: the logits read in forward and again in backward, the gradient written
(3 x rows x vocab elements of the logits' dtype). The Triton kernel runs on CUDA, or on a CPU in
Triton's interpreter when TRITON_INTERPRET=1 is set (slow: only to check the plumbing).
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

from megatron_unipool.kernels import cross_entropy as ce  # noqa: E402
from megatron_unipool.kernels.triton_support import interpreting, triton  # noqa: E402
from megatron_unipool.training.hardware import device_name  # noqa: E402
from measurement import (add_measurement_arguments, compute_dtype, measure_row, print_table,  # noqa: E402
                         time_forward_backward)


def measure(impl: str, rows: int, vocab: int, args, device, dtype) -> float:
    """Median seconds of forward + backward of the summed loss."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=generator) * 2).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    return time_forward_backward(lambda x: ce.cross_entropy_sum(x, targets, impl), [], logits, args.repeats, args.warmup)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8192, 32768], help="tokens per micro-batch")
    parser.add_argument("--vocab", type=int, nargs="+", default=[51200])
    add_measurement_arguments(parser, repeats=10, warmup=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_label = device_name()
    dtype = compute_dtype(args.dtype, device)
    impls = ["torch"]
    if triton is not None and (device.type == "cuda" or interpreting()):
        impls.append("triton")
    else:
        print("  triton not measured: Triton is not installed, or no CUDA device (TRITON_INTERPRET=1 runs it on a CPU)",
              file=sys.stderr)
    results = []
    for vocab in args.vocab:
        for rows in args.rows:
            for impl in impls:
                row = {"impl": impl, "rows": rows, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
                       "device": device_label}
                least_bytes = 3 * rows * vocab * dtype.itemsize
                measure_row(results, row, f"{impl:6s} rows {rows:6d} vocab {vocab:6d}",
                            lambda impl=impl, rows=rows, vocab=vocab: measure(impl, rows, vocab, args, device, dtype),
                            lambda seconds, least_bytes=least_bytes: {"ms": 1e3 * seconds,
                                                                      "gb_per_s": least_bytes / seconds / 1e9},
                            args.json)
    for row in results:
        twin = next((r for r in results if r["impl"] == "torch" and r["rows"] == row["rows"]
                     and r["vocab"] == row["vocab"] and "error" not in r), None)
        if "error" not in row:
            row["speedup_vs_torch"] = twin["ms"] / row["ms"] if twin else None
    print(f"cross-entropy forward+backward on {device_label}, {str(dtype).removeprefix('torch.')} logits")
    print_table(results, [("vocab", "vocab", 6, ""), ("rows", "rows", 7, ""), ("impl", "impl", 6, ""),
                          ("ms", "ms", 9, "{:.2f}"), ("GB/s", "gb_per_s", 8, "{:.1f}"),
                          ("vs torch", "speedup_vs_torch", 9, "{:.2f}x")])
    if args.json:  # again, with the ratios
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
