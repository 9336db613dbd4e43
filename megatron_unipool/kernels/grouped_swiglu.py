"""SwiGLU experts applied to tokens already sorted by expert (dropless grouped GEMM).

Shapes: S sorted token slots, D hidden, F expert width, M experts.
x_SD holds expert 0's tokens first, then expert 1's, ...; counts_M says how many each has.
Each expert's tokens are one contiguous slice, so the work is M dense GEMMs, never a per-token loop.
Slices are taken with split/unbind: their backward writes each gradient once, whereas indexing
`w[e]` or `x[a:b]` per expert would materialise a full-size gradient per expert.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_swiglu(
    x_SD: torch.Tensor, counts_M: torch.Tensor, w_gate_MFD: torch.Tensor, w_up_MFD: torch.Tensor, w_down_MDF: torch.Tensor
) -> torch.Tensor:
    """out[s] = W_down[e] (silu(W_gate[e] x[s]) * W_up[e] x[s]) for the expert e owning slot s."""
    counts = counts_M.tolist()
    outputs = []
    for x, count, w_gate, w_up, w_down in zip(
        x_SD.split(counts), counts, w_gate_MFD.unbind(0), w_up_MFD.unbind(0), w_down_MDF.unbind(0)
    ):
        if count:
            outputs.append((F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t())
    if not outputs:  # no slots: an empty result still tied to x_SD, so every rank's backward has the same steps
        return x_SD * 0
    return torch.cat(outputs)
