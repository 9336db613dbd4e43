"""Tokenise a corpus once into memory-mapped training files: plain text, JSON lines (.jsonl, or compressed:
.jsonl.gz, .jsonl.zst as The Pile ships) or Parquet (as Hugging Face datasets ship; needs pyarrow).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer gpt2 --valid-fraction 0.01 --workers 8

Several inputs (a corpus's shards: ``--input web/*.jsonl``) are read in the order given, as one corpus.
Writes ``P.bin``/``P.idx``, or with ``--valid-fraction F`` ``P_train`` and
``P_valid`` (the last ceil(F * n) whole documents).  With
``--train-tokenizer-vocab N --tokenizer-output PATH`` a byte-level BPE is first
trained on the training documents (never the validation ones) and then used.
Every file is written under a staging name and all are published together once
complete: a failure, Ctrl-C or SIGTERM (exit 130 or 143) leaves the previous ones as they were.
Outputs that exist (the splits, --tokenizer-output) are replaced only with --force: without it the
command stops (exit 2) before reading the input.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import itertools
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

if importlib.util.find_spec("megatron_unipool") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_unipool.data import (
    DataError,
    build_tokenizer,
    holdout_count,
    publish_indexed,
    read_documents,
    remove_indexed,
    train_bpe_tokenizer,
    write_indexed,
)
from megatron_unipool.data.corpus import InputProgress
from megatron_unipool.data.readers import ReadStats, count_documents, input_format
from megatron_unipool.data.tokenizers import MIN_BPE_VOCAB
from megatron_unipool.training.outputs import check_output_directory, check_output_file

PROGRESS_EVERY_S = 10.0


class Interruption:
    """SIGINT or SIGTERM (from `timeout`, a scheduler): a KeyboardInterrupt, whose clean-up removes the
    staged files; the tool exits 128 + the signal's number. Later signals are ignored so that the
    clean-up runs whole (`timeout` signals the process and then its process group, which holds it too).
    A KeyboardInterrupt raised inside a finalizer or an at-fork hook is lost: `check` raises it again,
    so an interrupted run never publishes. While the files are published (`publishing`) a signal is
    only noted: the renames finish, and the new files stand whole."""

    def __init__(self):
        self.seen, self.exit_status, self.publishing = False, 130, False

    def __call__(self, signum, frame) -> None:
        if not self.seen:
            self.seen, self.exit_status = True, 128 + signum
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, signal.SIG_IGN)
        if not self.publishing:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", required=True, type=Path, nargs="+", action="extend",
        help=".txt (one document), .jsonl, .jsonl.gz, .jsonl.zst (one per line) or .parquet (one per row) files,"
             " read in the order given",
    )
    parser.add_argument("--json-key", help="field of each JSON line, or Parquet column, holding the text (default: text)")
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
        help="train a byte-level BPE of N tokens on the training documents (not the --valid-fraction ones)",
    )
    parser.add_argument(
        "--tokenizer-output", type=Path, help="where --train-tokenizer-vocab saves tokenizer.json"
    )
    parser.add_argument(
        "--valid-fraction", type=float, default=0.0, help="fraction of documents (the last ones) held out"
    )
    parser.add_argument("--workers", type=int, default=1, help="encoding processes")
    parser.add_argument("--force", action="store_true",
                        help="replace outputs that exist (a run reading them would continue on other tokens)")
    args = parser.parse_args(argv)
    # an option of the other input type would be ignored: the user meant another split of the documents
    try:
        formats = {path: input_format(path) for path in args.input}
    except DataError as error:
        parser.error(str(error))
    for option, given, kinds, named in (("--json-key", args.json_key is not None, ("jsonl", "parquet"),
                                         "JSON-lines or Parquet"),
                                        ("--split-on-blank-lines", args.split_on_blank_lines, ("text",), ".txt")):
        other = next((path for path, kind in formats.items() if kind not in kinds), None)
        if given and other is not None:
            parser.error(f"{option} is for a {named} input, not {other}")
    seen: dict[Path, Path] = {}
    for path in args.input:
        first = seen.setdefault(path.resolve(), path)
        if first is not path:  # its documents would be read twice
            parser.error(f"--input names {path} twice" + ("" if str(first) == str(path) else f" ({first} and {path})"))
    if args.json_key is None:
        args.json_key = "text"
    if args.train_tokenizer_vocab is not None and args.tokenizer_output is None:
        parser.error("--train-tokenizer-vocab needs --tokenizer-output")
    if args.tokenizer_output is not None and args.train_tokenizer_vocab is None:
        parser.error("--tokenizer-output is only used with --train-tokenizer-vocab")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    # checked again where they are used; here, before the input is read (minutes for a large corpus)
    if not 0 <= args.valid_fraction < 1:
        parser.error(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    if args.train_tokenizer_vocab is not None and args.train_tokenizer_vocab < MIN_BPE_VOCAB:
        parser.error(f"--train-tokenizer-vocab {args.train_tokenizer_vocab} is too small: byte-level BPE needs at"
                     f" least {MIN_BPE_VOCAB} (256 bytes + EOD)")
    if os.path.basename(args.output_prefix) in ("", ".", ".."):
        parser.error(f"--output-prefix {args.output_prefix!r} has no file name: give one, e.g. "
                     f"{os.path.join(args.output_prefix, 'corpus')} for corpus.bin/.idx there")
    if args.tokenizer_output is not None:
        if args.tokenizer_output.is_dir():
            parser.error(f"--tokenizer-output {args.tokenizer_output} is a directory; give the file to write")
        outputs = [Path(f"{args.output_prefix}{split}{suffix}")
                   for split in ("", "_train", "_valid") for suffix in (".bin", ".idx")]
        taken_paths = [*((path, "an --input") for path in args.input),
                       *((path, "an output of --output-prefix") for path in outputs)]
        for taken, what in taken_paths:
            if args.tokenizer_output.resolve() == taken.resolve():
                parser.error(f"--tokenizer-output {args.tokenizer_output} is {what} ({taken}); give another path")
    splits = ("_train", "_valid") if args.valid_fraction > 0 else ("",)
    written = [Path(f"{args.output_prefix}{split}{suffix}") for split in splits for suffix in (".bin", ".idx")]
    existing = [path for path in written if path.exists()]
    other = "--output-prefix" if existing else "--tokenizer-output"
    if args.tokenizer_output is not None and args.tokenizer_output.exists():
        existing.append(args.tokenizer_output)
    if existing and not args.force:
        parser.error(f"{', '.join(map(str, existing))} already exist{'s' * (len(existing) == 1)}: pass --force to"
                     f" replace (a run reading them would continue on other tokens), or choose another {other}")
    return args


def staging_name(target: str | os.PathLike) -> str:
    """Where ``target`` is written before it is published. The name holds this host and process, so that a
    later run can tell the files of a run that was killed (SIGKILL, the OOM killer) from those of one still
    running, on this host or on another sharing the file system."""
    return f"{_staged_on_this_host(target)}{os.getpid()}"


def _staged_on_this_host(target: str | os.PathLike) -> str:
    """What every staging name of ``target`` written on this host starts with; the process id follows."""
    return f"{target}.partial-{socket.gethostname()}-"


def remove_abandoned_staging(targets: Iterable[str | os.PathLike]) -> list[Path]:
    """Deletes the staged files of ``targets`` left by runs on this host whose process is gone; a killed run
    had no chance to, and each can hold a dataset's worth of disk."""
    removed = []
    for target in map(Path, targets):
        ours = Path(_staged_on_this_host(target)).name
        for path in target.parent.glob(f"{glob.escape(ours)}*"):
            pid = re.match(r"(\d+)(\.|$)", path.name[len(ours):])
            if pid and not process_exists(int(pid[1])):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_staged(staging: str) -> None:
    """Deletes every file named after ``staging``: its pair, and the temporary files its writer creates
    first, which an interrupt that comes while they are created leaves behind. The name holds this
    process's id, so none of them is another run's."""
    staging = Path(staging)
    for path in staging.parent.glob(f"{glob.escape(staging.name)}.*"):
        path.unlink(missing_ok=True)


def reported(documents: Iterable[str], what: str, expected: int) -> Iterator[str]:
    """``documents``, with a line on how many went by at most every PROGRESS_EVERY_S: the BPE trainer reads
    them silently (its own progress bars leave only blank lines in a log)."""
    started = last_report = time.perf_counter()
    for done, document in enumerate(documents, start=1):
        yield document
        now = time.perf_counter()
        if now - last_report >= PROGRESS_EVERY_S:
            print(f"{what}: {done}/{expected} documents ({100 * done / expected:.1f}%) in {now - started:.0f} s",
                  flush=True)
            last_report = now


def read_input(path: Path, args: argparse.Namespace, shard: bool) -> ReadStats:
    """One input read and checked whole (count_documents). A `shard` (one of several) gets a line of its own
    and may hold no document, which is noted."""
    read = count_documents(path, args.json_key, args.split_on_blank_lines, PROGRESS_EVERY_S, allow_empty=shard)
    if shard:
        print(f"  read {path}: {read}" + ("; note: no (non-blank) document" if read.documents == 0 else ""), flush=True)
    return read


def main(argv: list[str] | None = None, interruption: Interruption | None = None) -> None:
    args = parse_args(argv)
    interruption = interruption or Interruption()
    # before reading and training, not after
    check_output_directory(Path(args.output_prefix).parent, f"--output-prefix {args.output_prefix}")
    if args.tokenizer_output is not None:
        check_output_file(args.tokenizer_output, f"--tokenizer-output {args.tokenizer_output}")
    outputs = [f"{args.output_prefix}{split}" for split in ("", "_train", "_valid")]
    abandoned = remove_abandoned_staging(outputs + ([args.tokenizer_output] if args.tokenizer_output else []))
    if abandoned:
        print(f"removed {len(abandoned)} staged file{'s' * (len(abandoned) != 1)} of killed runs:"
              f" {', '.join(path.name for path in abandoned)}", flush=True)

    def documents():
        return itertools.chain.from_iterable(read_documents(path, args.json_key, args.split_on_blank_lines, shards)
                                             for path in args.input)

    tokenizer = build_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    # A full pass before writing: an empty input, a bad line or a bad fraction fails with nothing written.
    shards = len(args.input) > 1  # one of several may hold no document (a filtered shard), not all of them
    inputs = str(args.input[0]) if not shards else f"{len(args.input)} inputs"
    print(f"reading {inputs} ...", flush=True)
    read = ReadStats.total(read_input(path, args, shards) for path in args.input)
    if read.documents == 0:
        raise DataError(f"the {len(args.input)} inputs contain no (non-blank) documents")
    num_valid = holdout_count(read.documents, args.valid_fraction)
    num_train = read.documents - num_valid
    print(f"read {inputs}: {read}" + (f"; {num_valid} held out for validation" if num_valid else ""),
          flush=True)

    if num_valid == 0:
        splits = [(args.output_prefix, documents(), num_train)]
    else:
        stream = documents()
        splits = [
            (f"{args.output_prefix}_train", itertools.islice(stream, num_train), num_train),
            (f"{args.output_prefix}_valid", stream, num_valid),
        ]
    # Every file is written under a staging name and all are published together: a failure in the
    # second split never leaves the first (or a new tokenizer) beside files of an earlier run (or of none).
    staged = []
    staged_tokenizer = None
    try:
        if tokenizer is None:
            staged_tokenizer = Path(staging_name(args.tokenizer_output))
            print(f"training a byte-level BPE tokenizer of {args.train_tokenizer_vocab} tokens on the {num_train} "
                  "training documents ...", flush=True)
            started = time.perf_counter()
            tokenizer = train_bpe_tokenizer(
                reported(itertools.islice(documents(), num_train), "training the tokenizer", num_train),
                args.train_tokenizer_vocab, staged_tokenizer,
            )
            print(f"trained {tokenizer} in {time.perf_counter() - started:.1f} s", flush=True)
            if tokenizer.vocab_size < args.train_tokenizer_vocab:  # the BPE ran out of pairs to merge
                print(f"note: the training documents gave only {tokenizer.vocab_size} of the"
                      f" {args.train_tokenizer_vocab} tokens asked for", flush=True)
        progress = InputProgress(read.text_bytes)
        for prefix, split_documents, count in splits:
            interruption.check()
            staged.append((staging_name(prefix), prefix))
            print(f"encoding {prefix} ({count} documents) ...", flush=True)
            stats = write_indexed(
                staged[-1][0], tokenizer, split_documents, args.workers, report_every_s=PROGRESS_EVERY_S,
                expected_documents=count, report_as=prefix, input_progress=progress,
            )
            print(f"encoded {prefix}: {stats}", flush=True)
        interruption.check()
        interruption.publishing = True
        # The previous datasets go first: a crash between the renames then leaves missing files, which fail
        # loudly, never a new tokenizer beside token ids of the old one.
        for _, prefix in staged:
            remove_indexed(prefix)
        if staged_tokenizer is not None:
            os.replace(staged_tokenizer, args.tokenizer_output)
        publish_indexed(staged)
    finally:
        for staging, _ in staged:
            remove_staged(staging)
        if staged_tokenizer is not None:
            staged_tokenizer.unlink(missing_ok=True)
    written = [f"{prefix}.bin/.idx" for _, prefix in staged]
    print("wrote " + ", ".join(written + ([str(args.tokenizer_output)] if staged_tokenizer else [])), flush=True)
    if interruption.seen:
        print("preprocess_data: the interrupt came while the files were published: they were published whole",
              file=sys.stderr)


if __name__ == "__main__":
    interruption = Interruption()
    for stop in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(stop) is not signal.SIG_IGN:  # a job started in the background keeps ignoring Ctrl-C
            signal.signal(stop, interruption)
    try:
        main(interruption=interruption)
    except (OSError, ValueError) as error:
        sys.exit(f"preprocess_data: error: {error}")
    except KeyboardInterrupt:
        print("preprocess_data: interrupted; the previous files are unchanged", file=sys.stderr)
        sys.exit(interruption.exit_status)
