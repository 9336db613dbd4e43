"""Routing probe: replace one MoE layer's learned routing at a time by a uniformly random choice of
k experts and report how much the validation loss rises and the next-token accuracy falls (in points).

    python tools/routing_probe.py --checkpoint runs/tiny_unipool_cpu [--layers deep|all|2,3]
                                  [--top-n 8] [--seeds 3] [--output probe/]

Random experts come from the whole pool and, with --top-n N (default: moe.num_experts, a vanilla
layer's expert count; 0 disables it), from the N experts that layer uses most on the same
validation batches; N at least the pool size adds nothing (it is the pool) and is skipped, so a
vanilla model gets pool rows only by default. Writes probe.json and probe.png (loss and accuracy change
per layer) into --output, each replaced whole (a failed run leaves the previous ones).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
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
from megatron_unipool.training.probe import (Scores, add_routed_run_arguments, analysis_precision,  # noqa: E402
                                             open_routed_run, probe, routing_batches)


def chosen_layers(spec: str, moe_layers: list[int]) -> list[int]:
    if spec == "all":
        return moe_layers
    if spec == "deep":  # the deeper half of the MoE layers
        return moe_layers[len(moe_layers) // 2:]
    try:
        layers = [int(item) for item in spec.split(",")]
    except ValueError:
        raise ValueError(f"--layers {spec!r}: expected deep, all, or comma-separated layer numbers") from None
    unknown = [layer for layer in layers if layer not in moe_layers]
    if unknown:
        raise ValueError(f"--layers {spec}: {unknown} are not MoE layers (MoE layers: {moe_layers})")
    return sorted(set(layers))  # each once, in model order


def plot(rows: list[dict], baseline: Scores, path: Path) -> None:
    """The loss change and the accuracy change (in points) per layer, side by side."""
    sets = sorted({r["candidates"] for r in rows}, key=lambda s: s != "pool")
    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(5, 0.9 * len(layers) * len(sets)), 4))
    width = 0.8 / len(sets)
    panels = [("delta", 1, "validation loss change", f"loss {baseline.loss:.4f}"),
              ("accuracy_delta", 100, "next-token accuracy change (points)", f"accuracy {baseline.accuracy:.2%}")]
    for ax, (key, scale, label, learned) in zip(axes, panels):
        for i, name in enumerate(sets):
            changes = [scale * next(r[key] for r in rows if r["layer"] == layer and r["candidates"] == name)
                       for layer in layers]
            ax.bar([x + i * width for x in range(len(layers))], changes, width, label=f"random from {name}")
        ax.set_xticks([x + width * (len(sets) - 1) / 2 for x in range(len(layers))], [str(layer) for layer in layers])
        ax.set_xlabel("layer whose routing is randomised")
        ax.set_ylabel(label)
        ax.set_title(f"routing probe (learned routing: {learned})")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the path may be a temporary name
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_routed_run_arguments(parser, "probe", "the table, JSON and plot")
    parser.add_argument("--layers", default="deep", help="deep (default), all, or a comma-separated list")
    parser.add_argument("--top-n", type=int, default=None,
                        help="also draw from each layer's N most used experts (default: moe.num_experts; 0: no)")
    parser.add_argument("--seeds", type=int, default=1, help="random draws averaged per layer")
    args = parser.parse_args(argv)
    if args.seeds < 1:  # each loss is a mean over the draws
        parser.error(f"--seeds must be at least 1, not {args.seeds}")
    try:
        device, path, config, model = open_routed_run(parser, args, "there is no routing to probe")
        layers = chosen_layers(args.layers, config.moe.moe_layers(config.model.num_layers))
        top_n = config.moe.num_experts if args.top_n is None else args.top_n
        if top_n and top_n < config.moe.top_k:
            raise ValueError(f"--top-n {top_n} is below moe.top_k={config.moe.top_k}")
        print("reading the validation data ...", flush=True)
        batches, eod_id = routing_batches(config, args.eval_batches)
    except (CheckpointError, ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"probing layers {layers} of {path} on {sum(len(b) for b in batches)} validation sequences ({device},"
          f" {args.precision}; the learned routing first, then {args.seeds} draw(s) per layer and candidate set) ...",
          flush=True)
    with analysis_precision(device, args.precision):
        baseline, rows = probe(model, batches, layers, top_n, args.seeds,
                               progress=lambda done, total: print(f"  {done}/{total} layers probed", flush=True),
                               eod_id=eod_id)
    rows = [asdict(r) for r in rows]
    print(f"learned routing: validation loss {baseline.loss:.4f}, next-token accuracy {baseline.accuracy:.2%}")
    print(f"{'layer':>5} {'random from':>12} {'loss':>8} {'change':>8} {'accuracy':>9} {'points':>7}")
    for r in rows:
        print(f"{r['layer']:>5} {r['candidates']:>12} {r['loss']:>8.4f} {r['delta']:>+8.4f} {r['accuracy']:>9.2%}"
              f" {100 * r['accuracy_delta']:>+7.2f}")
    args.output.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"checkpoint": str(path), "baseline": baseline.loss, "baseline_accuracy": baseline.accuracy,
                       "rows": rows}, indent=2)
    save_atomically(args.output / "probe.json", lambda temporary: temporary.write_text(text))
    save_atomically(args.output / "probe.png", lambda temporary: plot(rows, baseline, temporary))
    print(f"wrote {args.output / 'probe.json'} and {args.output / 'probe.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
