"""Pretrain a dense, vanilla-MoE or UniPool model from a JSON config.

    python launch/pretrain.py [--config PATH] [--run-dir DIR] [--set section.key=value ...]

Without --config it trains configs/tiny_unipool_cpu.json (a few minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_unipool  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from megatron_unipool.config import ConfigError, load_config  # noqa: E402
from megatron_unipool.training import Trainer  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "tiny_unipool_cpu.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="JSON config (default: %(default)s)")
    parser.add_argument("--run-dir", default=None, help="checkpoints, TensorBoard events, summary.json (default: runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field, type-checked like the file; repeatable")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    summary = Trainer(config, run_dir).train()
    print(f"done: {summary['steps']} steps, final train loss {summary['final_train_loss']:.4f}, "
          f"validation loss {summary['final_val_loss']:.4f}, {summary['tokens_per_second']:,.0f} tokens/s; "
          f"summary in {run_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
