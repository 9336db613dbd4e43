"""Tokenise a .txt or .jsonl corpus once into memory-mapped training files.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer gpt2 --valid-fraction 0.01 --workers 8

Writes ``P.bin``/``P.idx``, or with ``--valid-fraction F`` ``P_train`` and
``P_valid`` (the last ceil(F * n) whole documents).  With
``--train-tokenizer-vocab N --tokenizer-output PATH`` a byte-level BPE is first
trained on the input and then used.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import time
from pathlib import Path

if importlib.util.find_spec("megatron_unipool") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_unipool.data import (
    build_tokenizer,
    holdout_count,
    publish_indexed,
    read_documents,
    remove_indexed,
    train_bpe_tokenizer,
    write_indexed,
)

PROGRESS_EVERY_S = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", required=True, type=Path, help=".txt (one document) or .jsonl (one per line)"
    )
    parser.add_argument("--json-key", default="text", help="field holding the text in each .jsonl line")
    parser.add_argument(
        "--split-on-blank-lines",
        action="store_true",
        help=".txt: one document per blank-line-separated block",
    )
    parser.add_argument(
        "--output-prefix", required=True, help="writes PREFIX.bin/.idx (or PREFIX_train/_valid)"
    )
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", help="'byte', 'gpt2', or a path to a Hugging Face tokenizer.json")
    tokenizer.add_argument(
        "--train-tokenizer-vocab",
        type=int,
        metavar="N",
        help="train a byte-level BPE of N tokens on the input",
    )
    parser.add_argument(
        "--tokenizer-output", type=Path, help="where --train-tokenizer-vocab saves tokenizer.json"
    )
    parser.add_argument(
        "--valid-fraction", type=float, default=0.0, help="fraction of documents (the last ones) held out"
    )
    parser.add_argument("--workers", type=int, default=1, help="encoding processes")
    args = parser.parse_args(argv)
    if args.train_tokenizer_vocab is not None and args.tokenizer_output is None:
        parser.error("--train-tokenizer-vocab needs --tokenizer-output")
    if args.tokenizer_output is not None and args.train_tokenizer_vocab is None:
        parser.error("--tokenizer-output is only used with --train-tokenizer-vocab")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def documents():
        return read_documents(args.input, args.json_key, args.split_on_blank_lines)

    tokenizer = build_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    # A full pass before writing: an empty input, a bad line or a bad fraction fails with nothing written.
    started = time.perf_counter()
    num_documents = sum(1 for _ in documents())
    num_valid = holdout_count(num_documents, args.valid_fraction)
    print(f"read {num_documents} documents from {args.input} in {time.perf_counter() - started:.1f} s"
          + (f" ({num_valid} held out for validation)" if num_valid else ""), flush=True)
    if tokenizer is None:
        print(f"training a byte-level BPE tokenizer of {args.train_tokenizer_vocab} tokens on them ...", flush=True)
        started = time.perf_counter()
        tokenizer = train_bpe_tokenizer(documents(), args.train_tokenizer_vocab, args.tokenizer_output)
        print(
            f"trained {tokenizer} in {time.perf_counter() - started:.1f} s -> {args.tokenizer_output}",
            flush=True,
        )

    if num_valid == 0:
        splits = [(args.output_prefix, documents(), num_documents)]
    else:
        stream = documents()
        splits = [
            (f"{args.output_prefix}_train", itertools.islice(stream, num_documents - num_valid),
             num_documents - num_valid),
            (f"{args.output_prefix}_valid", stream, num_valid),
        ]
    # Every split is written under a staging name and all are published together: a failure in the
    # second never leaves the first beside a split of an earlier run (or of none).
    staged = []
    try:
        for prefix, split_documents, count in splits:
            staged.append((f"{prefix}.partial-{os.getpid()}", prefix))
            stats = write_indexed(
                staged[-1][0], tokenizer, split_documents, args.workers, report_every_s=PROGRESS_EVERY_S,
                expected_documents=count,
            )
            print(f"encoded {prefix}: {stats}", flush=True)
        publish_indexed(staged)
    finally:
        for staging, _ in staged:
            remove_indexed(staging)
    print("wrote " + ", ".join(f"{prefix}.bin/.idx" for _, prefix in staged), flush=True)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as error:
        sys.exit(f"preprocess_data: error: {error}")
