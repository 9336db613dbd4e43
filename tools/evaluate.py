"""Validation loss of a trained run on preprocessed files: the run's own validation files or any others of its
tokenizer (held-out domains), each on its own, without training.

    python tools/evaluate.py --checkpoint runs/tiny_unipool_cpu [--data data/code_valid data/web_valid]
                             [--eval-batches 4] [--device cuda] [--precision bf16] [--json eval.json]

Each file is read as training validates: `--eval-batches` global batches of model.seq_len-token sequences
(default: the run's train.eval_batches) spread evenly over the file, in the run's micro-batches, attention
within documents where the run trained so (model.document_masking). A file holding fewer sequences is read
whole. Prints a table of loss and perplexity per file; --json writes it (replaced whole, or not at all).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

try:
    import megatron_unipool  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_unipool.config import Config, ConfigError  # noqa: E402
from megatron_unipool.data import BlendedSamples, IndexedDataset, Samples, TokenSampleDataset  # noqa: E402
from megatron_unipool.training import CheckpointError, DataError, build_datasets  # noqa: E402
from megatron_unipool.training.checkpoint import load_trained_model  # noqa: E402
from megatron_unipool.training.datasets import validation_batches  # noqa: E402
from megatron_unipool.training.outputs import check_output_directory, write_json_report  # noqa: E402
from megatron_unipool.training.probe import analysis_device, analysis_precision, evaluate_loss  # noqa: E402


def run_validation_files(config: Config) -> dict[str, Samples]:
    """The run's validation split, file by file (a blend's files each on its own)."""
    valid = build_datasets(config).valid
    sources = valid.sources if isinstance(valid, BlendedSamples) else [valid]
    return {str(source.dataset.bin_path.with_suffix("")): source for source in sources}


def given_files(prefixes: list[str], config: Config, tokenizer: str | None) -> dict[str, Samples]:
    """Each prefix's sequences, as validation reads them; a file of another tokenizer, or with ids past the
    model's vocabulary, is a DataError naming it."""
    files = {}
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        if tokenizer and dataset.tokenizer and dataset.tokenizer != tokenizer:
            raise DataError(f"{prefix} was written by tokenizer {dataset.tokenizer}, the run trained on ids of"
                            f" {tokenizer}: its ids mean other text to the model")
        if dataset.vocab_size > config.model.vocab_size:
            raise DataError(f"{prefix} was tokenised with a vocabulary of {dataset.vocab_size} tokens, larger than the"
                            f" model's {config.model.vocab_size}")
        files[str(Path(prefix).absolute())] = TokenSampleDataset(dataset, config.model.seq_len, config.train.seed,
                                                                 unshuffled=True)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="run directory or step_* directory")
    parser.add_argument("--data", nargs="+", metavar="PREFIX",
                        help="preprocessed files to evaluate (default: the run's validation files)")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="global batches of sequences per file (default: the run's train.eval_batches)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where there is one)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the forward passes under bf16 autocast, as training computes them")
    parser.add_argument("--json", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    if args.eval_batches is not None and args.eval_batches < 1:
        parser.error(f"--eval-batches must be at least 1, not {args.eval_batches}")
    if args.data and len(set(args.data)) < len(args.data):
        parser.error("--data names a file twice")
    try:
        device = analysis_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.json is not None:
            check_output_directory(args.json.parent, f"--json {args.json}")
        print(f"loading {args.checkpoint} ...", flush=True)
        path, payload, config, model = load_trained_model(args.checkpoint)
        recorded = payload["train_state"].get("tokenizer")
        files = given_files(args.data, config, recorded) if args.data else run_validation_files(config)
        eod_ids = {prefix: samples.dataset.eod_id for prefix, samples in files.items()}
    except (CheckpointError, ConfigError, DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train = config.train
    sequences = (args.eval_batches or train.eval_batches) * train.global_batch
    model = model.to(device)
    rows = []
    for number, (prefix, samples) in enumerate(files.items(), 1):
        started = time.perf_counter()
        batches = validation_batches(samples, train.micro_batch, sequences)
        if not batches:
            print(f"error: {prefix} holds {len(samples)} sequences of {config.model.seq_len} tokens, fewer than"
                  f" train.micro_batch={train.micro_batch}", file=sys.stderr)
            return 2
        with analysis_precision(device, args.precision):
            loss = evaluate_loss(model, batches, eod_ids[prefix])
        rows.append({"prefix": prefix, "sequences": sum(len(batch) for batch in batches),
                     "tokens": sum(batch[:, 1:].numel() for batch in batches), "loss": loss,
                     "perplexity": math.exp(min(loss, 50.0))})
        print(f"  [{number}/{len(files)}] {prefix}: loss {loss:.4f} ({time.perf_counter() - started:.1f} s)", flush=True)
    width = max(len(row["prefix"]) for row in rows)
    print(f"{'file':<{width}} {'sequences':>9} {'loss':>8} {'perplexity':>11}")
    for row in rows:
        print(f"{row['prefix']:<{width}} {row['sequences']:>9} {row['loss']:>8.4f} {row['perplexity']:>11.3f}")
    if args.json:
        write_json_report(args.json, {"checkpoint": str(path), "step": payload["train_state"]["step"],
                                      "device": str(device), "precision": args.precision, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
