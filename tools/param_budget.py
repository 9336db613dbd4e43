"""Parameter and FLOP budget of a config, without building the model.

    python tools/param_budget.py --config configs/unipool_182m.json [--set k=v ...] [--json]

Prints total parameters, active parameters per token, expert parameters as a percentage of the
vanilla budget (moe.num_experts per MoE layer) and training FLOPs per token.
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

from megatron_unipool.config import ConfigError, load_config  # noqa: E402
from megatron_unipool.model import param_budget  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, world_size=None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    budget = param_budget(config.model, config.moe).as_dict()
    if args.json:
        print(json.dumps({"config": args.config, **budget}))
        return 0
    rows = [
        ("total parameters", f"{budget['total_params']:,} ({budget['total_params'] / 1e6:.1f}M)"),
        ("active parameters per token", f"{budget['active_params']:,} ({budget['active_params'] / 1e6:.1f}M)"),
        ("embedding parameters", f"{budget['embedding_params']:,}"),
        ("expert parameters", f"{budget['expert_params']:,} in {budget['num_pools']} pool(s) of {budget['experts_per_pool']} experts"),
        ("vanilla expert budget", f"{budget['vanilla_expert_params']:,}"),
        ("experts as % of vanilla", f"{budget['expert_budget_percent']:.1f}%"),
        ("training FLOPs per token", f"{budget['train_flops_per_token']:.4g}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{args.config} ({config.moe.kind})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
