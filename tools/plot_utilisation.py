"""Pool utilisation of a checkpoint on the validation data: which layer uses which expert, the load
of each expert over all layers, and how many distinct experts a token meets across depth.

    python tools/plot_utilisation.py --checkpoint runs/tiny_unipool_cpu [--output utilisation/]

Writes utilisation.png (per pool: layer x expert heatmap over per-expert load, the quantity the
pool-level aux loss balances), unique_experts.png (mean distinct experts per token after each MoE
layer, against the k-per-layer maximum) and utilisation.json, each replaced whole. The same heatmap
is in TensorBoard during training (pool/utilisation).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import megatron_unipool  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from megatron_unipool.config import ConfigError  # noqa: E402
from megatron_unipool.training import CheckpointError, DataError  # noqa: E402
from megatron_unipool.training.outputs import save_atomically  # noqa: E402
from megatron_unipool.training.plots import utilisation_figure  # noqa: E402
from megatron_unipool.training.probe import (add_routed_run_arguments, analysis_precision,  # noqa: E402
                                             open_routed_run, record_routing, routing_batches,
                                             unique_experts_by_depth)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_routed_run_arguments(parser, "utilisation", "the plots")
    args = parser.parse_args(argv)
    try:
        device, path, config, model = open_routed_run(parser, args, "it has no experts")
        print("reading the validation data ...", flush=True)
        batches, eod_id = routing_batches(config, args.eval_batches)
    except (CheckpointError, ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"routing {sum(b[:, 1:].numel() for b in batches):,} validation tokens through {path} ({device},"
          f" {args.precision}) ...", flush=True)
    with analysis_precision(device, args.precision):
        _, routing = record_routing(model, batches, eod_id)
    layout = config.moe.pool_layout(config.model.num_layers)
    experts = config.moe.experts_per_pool(config.model.num_layers)
    pool_of_layer = {layer: p for p, layers in enumerate(layout) for layer in layers}
    counts = [torch.stack([torch.bincount(routing[layer][routing[layer] >= 0], minlength=experts) for layer in layers])
              for layers in layout]
    curve = unique_experts_by_depth(routing, pool_of_layer, experts)
    # NormRouter leaves slots empty (-1): the heatmap's rows are shares of the routed slots only, so say how
    # many slots each layer had and how many reached no expert
    slots = {layer: routing[layer].numel() for layer in routing}
    unrouted = {layer: int((routing[layer] < 0).sum()) / max(slots[layer], 1) for layer in routing}
    args.output.mkdir(parents=True, exist_ok=True)
    figure = utilisation_figure([c.numpy() for c in counts], f"pool utilisation ({path.name})", layout)
    save_atomically(args.output / "utilisation.png", lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    moe_layers = sorted(routing)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(curve) + 1), curve, marker="o", label="distinct experts met")
    ax.plot(range(1, len(curve) + 1), [config.moe.top_k * (i + 1) for i in range(len(curve))], linestyle="--",
            color="gray", label="k per layer (all distinct)")
    ax.set_xticks(range(1, len(curve) + 1))
    ax.set_xlabel("MoE layers passed")
    ax.set_ylabel("experts per token")
    ax.set_title(f"{config.moe.kind}: distinct experts per token across depth")
    ax.legend()
    fig.tight_layout()
    save_atomically(args.output / "unique_experts.png", lambda temporary: fig.savefig(temporary, dpi=120, format="png"))
    plt.close(fig)
    loads = [(c.sum(0).double() / max(int(c.sum()), 1)).tolist() for c in counts]
    text = json.dumps({
        "checkpoint": str(path), "moe_layers": moe_layers, "pools": layout,
        "counts_per_pool": [c.tolist() for c in counts], "load_per_pool": loads,
        "unique_experts_by_depth": curve, "slots_per_layer": [slots[layer] for layer in moe_layers],
        "unrouted_share_per_layer": [unrouted[layer] for layer in moe_layers]}, indent=2)
    save_atomically(args.output / "utilisation.json", lambda temporary: temporary.write_text(text))
    for p, load in enumerate(loads):
        used = sum(1 for share in load if share > 0)
        print(f"pool {p}: {used}/{len(load)} experts used; largest load share {max(load):.3f} (uniform {1 / len(load):.3f})")
    if any(unrouted.values()):
        print("slots that reached no expert (not in the heatmap's shares): "
              + ", ".join(f"layer {layer} {100 * unrouted[layer]:.1f}%" for layer in moe_layers))
    print("distinct experts per token after each MoE layer: " + ", ".join(f"{v:.2f}" for v in curve))
    print(f"wrote {args.output / 'utilisation.png'}, {args.output / 'unique_experts.png'}, {args.output / 'utilisation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
