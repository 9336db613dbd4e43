"""Validation loss, perplexity and next-token accuracy of a trained run on preprocessed files: the run's own
validation files or any others of its tokenizer (held-out domains), each on its own, without training.

    python tools/evaluate.py --checkpoint runs/tiny_unipool_cpu [--data data/code_valid data/web_valid]
                             [--eval-batches 4] [--device cuda] [--precision bf16] [--json eval.json]

Each file is read as training validates: `--eval-batches` global batches of model.seq_len-token sequences
(default: the run's train.eval_batches) spread evenly over the file, in the run's micro-batches, attention
within documents where the run trained so (model.document_masking). A file holding fewer sequences is read
whole. Files of another tokenizer than the run's training data are refused; every file is read and checked
before the first is evaluated. A run that has read no training data (an import) needs --data: its data
section is defaults. Prints a table of loss, perplexity and accuracy per file; --json writes it (replaced
whole, or not at all).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

try:
    import megatron_unipool  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_unipool.config import Config, ConfigError, as_blend  # noqa: E402
from megatron_unipool.data import IndexedDataset, Samples, TokenSampleDataset, prepare_default_corpus  # noqa: E402
from megatron_unipool.training import CheckpointError, DataError  # noqa: E402
from megatron_unipool.training.checkpoint import load_trained_model  # noqa: E402
from megatron_unipool.training.datasets import validation_batches  # noqa: E402
from megatron_unipool.training.outputs import check_output_file, write_json_report  # noqa: E402
from megatron_unipool.training.probe import analysis_device, analysis_precision, next_token_scores  # noqa: E402


PROGRESS_EVERY_S = 10.0


def run_validation_prefixes(config: Config, train_state: dict) -> list[str]:
    """The run's validation files (a blend's each on its own); only they are read. A run that has read no
    training data (an import, or one upcycled from it) has a data section it never trained on: a DataError."""
    if not train_state.get("consumed_samples"):
        raise DataError("the run has read no training data (an import, or a model upcycled from one), so its data"
                        " section may name files it never saw: pass the files to evaluate as --data")
    data = config.data
    if data.corpus is not None:
        return [prepare_default_corpus(data.tokenizer, data.cache_dir)[1]]
    prefixes = list(as_blend(data.valid_prefix))
    for prefix in prefixes:
        if not Path(f"{prefix}.idx").is_file():
            raise DataError(f"the run's validation file {prefix} is not there (moved?): name the files to evaluate"
                            " with --data")
    return prefixes


def sequences_of(prefixes: list[str], config: Config, train_state: dict) -> dict[str, Samples]:
    """Each file's sequences, as validation reads them, by absolute prefix. A file of another tokenizer than the
    run's training data (its name, vocabulary or end-of-document id, as far as the run records them), or with
    ids past the model's vocabulary, is a DataError naming it."""
    files = {}
    run = {"tokenizer": train_state.get("tokenizer"), "vocabulary": train_state.get("tokenizer_vocab_size"),
           "EOD id": train_state.get("eod_id")}
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        own = {"tokenizer": dataset.tokenizer, "vocabulary": dataset.vocab_size, "EOD id": dataset.eod_id}
        differ = [key for key, value in run.items() if value is not None and own[key] is not None and own[key] != value]
        if differ:
            raise DataError(f"{prefix} comes from another tokenizer than the run's training data: "
                            + ", ".join(f"{key} {own[key]} (the run's: {run[key]})" for key in differ))
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where there is one)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the forward passes under bf16 autocast, as training computes them")
    parser.add_argument("--json", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    if args.eval_batches is not None and args.eval_batches < 1:
        parser.error(f"--eval-batches must be at least 1, not {args.eval_batches}")
    if args.data and len({os.path.realpath(prefix) for prefix in args.data}) < len(args.data):
        parser.error("--data names a file twice")
    try:
        device = analysis_device(args.device)
        if args.json is not None:
            check_output_file(args.json, f"--json {args.json}")
        print(f"loading {args.checkpoint} ...", flush=True)
        path, payload, config, model = load_trained_model(args.checkpoint)
        state = payload["train_state"]
        files = sequences_of(args.data or run_validation_prefixes(config, state), config, state)
        train = config.train
        sequences = (args.eval_batches or train.eval_batches) * train.global_batch
        batches_of = {prefix: validation_batches(samples, train.micro_batch, sequences)  # read (and checked) first
                      for prefix, samples in files.items()}
        for prefix, batches in batches_of.items():
            if not batches:
                raise DataError(f"{prefix} holds {len(files[prefix])} sequences of {config.model.seq_len} tokens, fewer"
                                f" than train.micro_batch={train.micro_batch}")
    except (CheckpointError, ConfigError, DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if state.get("tokenizer") is None:
        print("note: the run does not record the tokenizer its ids belong to (an import, or data files of an older"
              " format): the files' ids are taken to be the model's", flush=True)
    model = model.to(device)
    rows = []
    for number, (prefix, batches) in enumerate(batches_of.items(), 1):
        started = last_report = time.perf_counter()

        def progress(done: int) -> None:  # a large model's file takes minutes: a line every 10 s
            nonlocal last_report
            if (now := time.perf_counter()) - last_report >= PROGRESS_EVERY_S and done < len(batches):
                print(f"  [{number}/{len(files)}] {prefix}: {done}/{len(batches)} micro-batches", flush=True)
                last_report = now

        with analysis_precision(device, args.precision):
            loss, accuracy = next_token_scores(model, batches, files[prefix].dataset.eod_id, progress)
        rows.append({"prefix": prefix, "sequences": sum(len(batch) for batch in batches),
                     "tokens": sum(batch[:, 1:].numel() for batch in batches), "loss": loss,
                     "perplexity": math.exp(min(loss, 50.0)), "accuracy": accuracy})
        print(f"  [{number}/{len(files)}] {prefix}: loss {loss:.4f} ({time.perf_counter() - started:.1f} s)", flush=True)
    width = max(len(row["prefix"]) for row in rows)
    print(f"{'file':<{width}} {'sequences':>9} {'loss':>8} {'perplexity':>11} {'accuracy':>9}")
    for row in rows:
        print(f"{row['prefix']:<{width}} {row['sequences']:>9} {row['loss']:>8.4f} {row['perplexity']:>11.3f}"
              f" {row['accuracy']:>9.2%}")
    if args.json:
        write_json_report(args.json, {"checkpoint": str(path), "step": payload["train_state"]["step"],
                                      "device": str(device), "precision": args.precision, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
