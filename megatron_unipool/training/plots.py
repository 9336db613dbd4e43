"""Pool-utilisation figures: which layer sends how much of its traffic to which expert."""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure  # not pyplot: importing the library leaves the caller's backend alone

MAX_ROW_LABELS = 16  # beyond this the layer labels of a heatmap overlap


def utilisation_figure(counts_per_pool: list[np.ndarray], title: str, layers_per_pool: list[list[int]]):
    """Per pool: a layer x expert heatmap (share of each layer's slots) over the load of each
    expert summed across all layers, the quantity the pool-level aux loss balances. Rows are
    labelled with `layers_per_pool` (model layer indices: dense layers in between skip). Single-row pools
    (vanilla: one per layer) are stacked into one panel, not one 4-inch column per layer."""
    per_layer = len(counts_per_pool) > 1 and all(np.asarray(c).shape[0] == 1 for c in counts_per_pool)
    if per_layer:
        counts_per_pool = [np.concatenate([np.asarray(c) for c in counts_per_pool])]
        layers_per_pool = [[layer for layers in layers_per_pool for layer in layers]]
    pools = len(counts_per_pool)
    # constrained layout: the heatmap, narrowed by its colorbar, and the bars below keep the same width
    fig = Figure(figsize=(max(6, 4 * pools), 6), layout="constrained")
    axes = fig.subplots(2, pools, squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
    for p, counts in enumerate(counts_per_pool):
        counts = np.asarray(counts, dtype=np.float64)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        heat = axes[0, p].imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
        names = layers_per_pool[p]
        rows = range(0, counts.shape[0], math.ceil(counts.shape[0] / MAX_ROW_LABELS))
        axes[0, p].set_yticks(rows, [str(names[r]) for r in rows])
        axes[0, p].set_xlabel("expert")
        axes[0, p].set_ylabel("layer")
        axes[0, p].set_title(f"{title}" + (f" (pool {p})" if pools > 1 else ""))
        fig.colorbar(heat, ax=axes[0, p], label="share of the layer's routed slots")
        load = counts.sum(axis=0) / max(counts.sum(), 1)
        axes[1, p].bar(np.arange(len(load)), load, width=1.0)
        axes[1, p].set_xlim(axes[0, p].get_xlim())  # column j of the heatmap above bar j
        axes[1, p].axhline(1.0 / len(load), color="red", linewidth=1, label="uniform")
        axes[1, p].set_xlabel("expert")
        # share of all the layers' routed slots (a layer routing fewer, NormRouter's empty slots, weighs less)
        axes[1, p].set_ylabel("load by expert index, all layers" if per_layer else "load, all layers")
        axes[1, p].legend(loc="upper right", fontsize="small")
    return fig
