"""Pool-utilisation figures: which layer sends how much of its traffic to which expert."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def utilisation_figure(counts_per_pool: list[np.ndarray], title: str = "pool utilisation",
                       layers_per_pool: list[list[int]] | None = None):
    """Per pool: a layer x expert heatmap (share of each layer's slots) over the load of each
    expert summed across all layers, the quantity the pool-level aux loss balances. Rows are
    labelled with `layers_per_pool` (model layer indices) when given, else 0..L-1."""
    pools = len(counts_per_pool)
    fig, axes = plt.subplots(2, pools, figsize=(max(6, 4 * pools), 6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})
    for p, counts in enumerate(counts_per_pool):
        counts = np.asarray(counts, dtype=np.float64)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        heat = axes[0, p].imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
        rows = range(counts.shape[0])
        axes[0, p].set_yticks(rows, [str(layer) for layer in (layers_per_pool[p] if layers_per_pool else rows)])
        axes[0, p].set_ylabel("layer")
        axes[0, p].set_title(f"{title}" + (f" (pool {p})" if pools > 1 else ""))
        fig.colorbar(heat, ax=axes[0, p], label="share of layer's slots")
        load = counts.sum(axis=0) / max(counts.sum(), 1)
        axes[1, p].bar(np.arange(len(load)), load, width=1.0)
        axes[1, p].axhline(1.0 / len(load), color="red", linewidth=1, label="uniform")
        axes[1, p].set_xlabel("expert")
        axes[1, p].set_ylabel("load, all layers")
        axes[1, p].legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig
