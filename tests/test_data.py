"""Data pipeline: indexed files, tokenizers, sample order, default corpus, preprocessing CLI."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tokenizers as hf_tokenizers
import torch

from megatron_unipool.data import (
    VALIDATION_PLAYS,
    ByteTokenizer,
    DataError,
    GPT2Tokenizer,
    HFTokenizer,
    IndexedDataset,
    IndexedDatasetWriter,
    TokenSampleDataset,
    build_tokenizer,
    holdout_count,
    play_of,
    prepare_default_corpus,
    read_documents,
    shakespeare_documents,
    split_shakespeare,
    train_bpe_tokenizer,
    write_indexed,
)
from megatron_unipool.data import corpus as corpus_module
from megatron_unipool.data.blending import BlendedSamples, period_shares
from megatron_unipool.data.corpus import InputProgress
from megatron_unipool.data.readers import ReadStats, count_documents
from script_modules import load_script

REPO_ROOT = Path(__file__).resolve().parent.parent
UNICODE_TEXT = "Ünïcödé: naïve café, 日本語, emoji 🎭🐍, combining e\u0301, tab\tand\nnewline."


def random_documents(rng: np.random.Generator, vocab_size: int, eod_id: int, count: int) -> list[np.ndarray]:
    """Documents of ids in [0, vocab_size) other than EOD, including an empty one."""
    documents = [rng.integers(0, vocab_size, size=rng.integers(0, 40)) for _ in range(count)]
    documents[1] = np.array([], dtype=np.int64)
    return [doc[doc != eod_id] for doc in documents]


def write_documents(prefix, documents, vocab_size, eod_id, tokenizer="test") -> None:
    with IndexedDatasetWriter(prefix, vocab_size, eod_id, tokenizer) as writer:
        for doc in documents:
            writer.add_document(doc)


def flat_stream(documents, eod_id) -> np.ndarray:
    return np.concatenate([np.append(doc, eod_id) for doc in documents]).astype(np.int64)


# ------------------------------------------------------------------ indexed dataset


@pytest.mark.parametrize(
    ("vocab_size", "expected_dtype"), [(1000, np.uint16), (65536, np.uint16), (70000, np.uint32)]
)
def test_indexed_round_trip_appends_eod(tmp_path, vocab_size, expected_dtype):
    rng = np.random.default_rng(0)
    eod_id = vocab_size - 1
    documents = random_documents(rng, vocab_size, eod_id, count=25)
    documents[2] = np.array([0, vocab_size - 2])  # the extreme ids survive the storage dtype
    write_documents(
        tmp_path / "ds",
        [doc.tolist() if i % 2 else doc for i, doc in enumerate(documents)],
        vocab_size,
        eod_id,
    )

    dataset = IndexedDataset(tmp_path / "ds")
    assert dataset.dtype == expected_dtype
    assert (dataset.vocab_size, dataset.eod_id, dataset.tokenizer) == (vocab_size, eod_id, "test")
    assert len(dataset) == dataset.num_documents == len(documents)
    np.testing.assert_array_equal(dataset.document_lengths, [len(doc) + 1 for doc in documents])
    for index, doc in enumerate(documents):
        stored = dataset.document(index)
        np.testing.assert_array_equal(stored[:-1], doc)
        assert stored[-1] == eod_id
    expected_stream = flat_stream(documents, eod_id)
    assert dataset.num_tokens == len(expected_stream)
    np.testing.assert_array_equal(dataset.tokens(0, dataset.num_tokens), expected_stream)
    np.testing.assert_array_equal(dataset.tokens(5, 60), expected_stream[5:60])
    assert (tmp_path / "ds.bin").stat().st_size == len(expected_stream) * np.dtype(expected_dtype).itemsize
    with pytest.raises(IndexError):
        dataset.document(len(documents))


@pytest.fixture
def small_dataset_prefix(tmp_path) -> Path:
    write_documents(tmp_path / "ds", [[1, 2, 3], [4, 5], [6]], vocab_size=100, eod_id=0)
    return tmp_path / "ds"


def test_truncated_and_oversized_bin_are_reported(small_dataset_prefix):
    bin_path = Path(f"{small_dataset_prefix}.bin")
    original = bin_path.read_bytes()
    bin_path.write_bytes(original[:-2])
    with pytest.raises(ValueError, match=r"truncated.*16 bytes.*18 bytes"):
        IndexedDataset(small_dataset_prefix)
    bin_path.write_bytes(original + b"\0\0")
    with pytest.raises(ValueError, match=r"mismatched.*20 bytes.*18 bytes"):
        IndexedDataset(small_dataset_prefix)


@pytest.mark.parametrize("suffix", [".idx", ".bin"])
def test_missing_file_is_named(small_dataset_prefix, suffix):
    Path(f"{small_dataset_prefix}{suffix}").unlink()
    with pytest.raises(FileNotFoundError, match=rf"ds\{suffix}"):
        IndexedDataset(small_dataset_prefix)


def test_a_prefix_given_with_its_suffix_is_named_with_what_to_do(small_dataset_prefix):
    """data.train_prefix = ".../ds.bin" looks for ds.bin.idx: the error says to drop the suffix."""
    for given in (f"{small_dataset_prefix}.bin", f"{small_dataset_prefix}.idx"):
        with pytest.raises(FileNotFoundError, match=r"ds\.(bin|idx)\.idx; give the prefix without \.bin/\.idx"):
            IndexedDataset(given)


def test_corrupted_magic_is_rejected(small_dataset_prefix):
    idx_path = Path(f"{small_dataset_prefix}.idx")
    raw = bytearray(idx_path.read_bytes())
    raw[0:4] = b"GPT2"
    idx_path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad magic"):
        IndexedDataset(small_dataset_prefix)


def test_a_megatron_index_is_named_with_what_to_do(small_dataset_prefix):
    idx_path = Path(f"{small_dataset_prefix}.idx")
    idx_path.write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QB", 1, 8) + bytes(64))  # Megatron-LM's header
    with pytest.raises(ValueError, match="is a Megatron-LM index.*tools/preprocess_data.py"):
        IndexedDataset(small_dataset_prefix)


def test_writer_refuses_a_vocabulary_or_eod_the_format_cannot_hold(tmp_path):
    """Ids are stored as at most uint32, and the reader refuses an EOD outside the vocabulary:
    the writer says so before it writes a file the reader would refuse or misread."""
    with pytest.raises(ValueError, match="vocab_size"):
        IndexedDatasetWriter(tmp_path / "ds", 2**32 + 1, 0, "test")
    with pytest.raises(ValueError, match="eod_id 100"):
        IndexedDatasetWriter(tmp_path / "ds", 100, 100, "test")
    for name in ("", "hf-0123456789abcdef", "bytë"):  # the index holds 16 ASCII bytes
        with pytest.raises(ValueError, match="1 to 16 ASCII characters"):
            IndexedDatasetWriter(tmp_path / "ds", 100, 0, name)
    with pytest.raises(RuntimeError, match="inside its `with` block"):
        IndexedDatasetWriter(tmp_path / "ds", 100, 0, "test").add_document([1])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("document, error", [(np.array([1.5]), "must be integers"), (np.int64(5), "1-D"),
                                             ([[1, 2]], "1-D")])
def test_writer_refuses_documents_that_are_not_lists_of_ids(tmp_path, document, error):
    """A float would be truncated (1.5 -> 1) and a scalar stored as a one-token document."""
    with pytest.raises(ValueError, match=error):
        write_documents(tmp_path / "ds", [document], vocab_size=100, eod_id=0)
    assert list(tmp_path.iterdir()) == []


def rewrite_header(prefix: Path, **fields) -> None:
    """Overwrite fields of the .idx header's first 48 bytes (magic, version, dtype, vocab, eod, docs, total)."""
    idx_path = Path(f"{prefix}.idx")
    raw = bytearray(idx_path.read_bytes())
    names = ["magic", "version", "dtype", "vocab", "eod", "num_docs", "total"]
    header = list(struct.unpack_from("<8sIIQQQQ", raw))
    for name, value in fields.items():
        header[names.index(name)] = value
    struct.pack_into("<8sIIQQQQ", raw, 0, *header)
    idx_path.write_bytes(bytes(raw))


def test_a_version_1_index_reads_with_no_tokenizer_named(small_dataset_prefix):
    """Files written before the index named its tokenizer: the 48-byte header, then the offsets."""
    idx_path = Path(f"{small_dataset_prefix}.idx")
    written = IndexedDataset(small_dataset_prefix)
    raw = bytearray(idx_path.read_bytes())
    idx_path.write_bytes(bytes(raw[:48]) + bytes(raw[64:]))
    rewrite_header(small_dataset_prefix, version=1)
    old = IndexedDataset(small_dataset_prefix)
    assert old.tokenizer is None and written.tokenizer == "test"
    assert (old.vocab_size, old.eod_id, old.num_documents) == (written.vocab_size, written.eod_id, 3)
    np.testing.assert_array_equal(old.tokens(0, old.num_tokens), written.tokens(0, written.num_tokens))


@pytest.mark.parametrize("fields, error", [
    ({"version": 3}, r"unsupported format version 3, this reader handles \[1, 2\]"),
    ({"dtype": 3}, "unknown dtype code 3"),
    ({"eod": 100}, "eod_id 100 is outside"),
    ({"vocab": 70000}, "tokens stored as uint16 for a vocabulary of 70000, which needs uint32"),
    ({"total": 8}, "total_tokens=8"),
])
def test_damaged_or_future_headers_are_named(small_dataset_prefix, fields, error):
    rewrite_header(small_dataset_prefix, **fields)
    with pytest.raises(ValueError, match=error):
        IndexedDataset(small_dataset_prefix)


def test_a_truncated_or_empty_index_is_a_value_error(small_dataset_prefix):
    """ValueError (not struct.error) is what the corpus cache takes as 'damaged: rebuild'."""
    idx_path = Path(f"{small_dataset_prefix}.idx")
    header = idx_path.read_bytes()[:64]  # version 2
    idx_path.write_bytes(header[:20])
    with pytest.raises(ValueError, match="too short for the 48-byte header"):
        IndexedDataset(small_dataset_prefix)
    idx_path.write_bytes(header[:56])
    with pytest.raises(ValueError, match="too short for the 64-byte version 2 header"):
        IndexedDataset(small_dataset_prefix)
    idx_path.write_bytes(header)
    rewrite_header(small_dataset_prefix, num_docs=0, total=0)
    idx_path.write_bytes(idx_path.read_bytes() + np.zeros(1, "<i8").tobytes())
    Path(f"{small_dataset_prefix}.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="holds no documents"):
        IndexedDataset(small_dataset_prefix)


@pytest.mark.parametrize("document, value, error", [(0, 1, "span"), (2, 3, "not increasing at document 1"),
                                                    (2, 4, "not increasing at document 1")])
def test_offsets_must_start_at_zero_and_increase(small_dataset_prefix, document, value, error):
    """Offsets [0, 4, 7, 9]: a first offset of 1 loses a token, a decreasing one overlaps documents,
    a repeated one is an empty document without its EOD."""
    idx_path = Path(f"{small_dataset_prefix}.idx")
    raw = bytearray(idx_path.read_bytes())
    offsets = np.frombuffer(bytes(raw[64:]), dtype="<i8").copy()  # header is 64 bytes
    np.testing.assert_array_equal(offsets, [0, 4, 7, 9])
    offsets[document] = value
    raw[64:] = offsets.tobytes()
    idx_path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=error):
        IndexedDataset(small_dataset_prefix)


@pytest.mark.parametrize("start, stop", [(0, 10), (5, 4), (-1, 2)])
def test_token_ranges_outside_the_stream_are_index_errors(small_dataset_prefix, start, stop):
    """A memmap slice past the end is silently short, and a negative start wraps: both would feed
    the model the wrong tokens."""
    dataset = IndexedDataset(small_dataset_prefix)
    assert dataset.num_tokens == 9
    with pytest.raises(IndexError):
        dataset.tokens(start, stop)
    for index in (-1, dataset.num_documents):
        with pytest.raises(IndexError):
            dataset.document(index)


def test_a_failure_between_the_renames_leaves_no_pair_from_two_writes(tmp_path, monkeypatch):
    """Rewriting a prefix fails after the new .bin is in place but before its .idx: the old .idx is gone,
    so the prefix fails to open, where it would have paired the new tokens with the old index (the same
    size here, so no size check could tell)."""
    from megatron_unipool.data import indexed_dataset

    write_documents(tmp_path / "ds", [np.array([1, 2, 3])], 100, 0)
    replace = os.replace

    def fails_on_the_index(source, target):
        if str(target).endswith(".idx"):
            raise OSError("disk full")
        replace(source, target)

    monkeypatch.setattr(indexed_dataset.os, "replace", fails_on_the_index)
    with pytest.raises(OSError, match="disk full"):
        write_documents(tmp_path / "ds", [np.array([4, 5, 6])], 100, 0)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        IndexedDataset(tmp_path / "ds")


def test_the_largest_vocabulary_stores_its_last_id(tmp_path):
    write_documents(tmp_path / "ds", [np.array([2**32 - 1, 7])], 2**32, 0)
    assert IndexedDataset(tmp_path / "ds").document(0).tolist() == [2**32 - 1, 7, 0]


def test_out_of_vocab_token_names_document_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"document 1: token id 100 is outside the vocabulary \[0, 100\)"):
        write_documents(tmp_path / "ds", [[1, 2], [3, 100]], vocab_size=100, eod_id=0)
    with pytest.raises(ValueError, match=r"document 0: token id -1"):
        write_documents(tmp_path / "ds", [[-1]], vocab_size=100, eod_id=0)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_leaves_previous_pair_intact(small_dataset_prefix):
    before = IndexedDataset(small_dataset_prefix).tokens(0, 9).copy()
    with (
        pytest.raises(RuntimeError, match="boom"),
        IndexedDatasetWriter(small_dataset_prefix, vocab_size=100, eod_id=0, tokenizer="test") as writer,
    ):
        writer.add_document([7, 7, 7, 7, 7])
        raise RuntimeError("boom")
    assert sorted(p.name for p in small_dataset_prefix.parent.iterdir()) == ["ds.bin", "ds.idx"]
    np.testing.assert_array_equal(IndexedDataset(small_dataset_prefix).tokens(0, 9), before)


def test_writer_stores_any_integer_array_as_little_endian_tokens(tmp_path, monkeypatch):
    """A strided view, a big-endian array and uint8 bytes are stored as the ids they hold (the writer
    hands the file the array's memory, which must then be contiguous little-endian storage dtype), a
    slice of _WRITE_SLICE tokens at a time."""
    from megatron_unipool.data import indexed_dataset

    monkeypatch.setattr(indexed_dataset, "_WRITE_SLICE", 4)
    ids = np.arange(40, dtype=np.int64)
    documents = [ids.astype(np.uint16)[::3], ids.astype(">u2"), np.frombuffer(b"abc", dtype=np.uint8), ids[5:5]]
    write_documents(tmp_path / "ds", documents, vocab_size=100, eod_id=99)
    dataset = IndexedDataset(tmp_path / "ds")
    assert [dataset.document(i)[:-1].tolist() for i in range(4)] == [d.tolist() for d in documents]
    assert (tmp_path / "ds.bin").read_bytes()[:4] == b"\x00\x00\x03\x00"  # 0 then 3, little-endian uint16


def test_a_tokenizer_giving_a_negative_id_is_named_by_the_writer(tmp_path):
    """The base encode_as_array keeps what encode returns: a custom tokenizer's -1 reaches the writer's range
    check (a cast to uint32 first made it an OverflowError naming no document, or a huge id)."""
    from megatron_unipool.data import Tokenizer

    class Broken(Tokenizer):
        name, vocab_size, eod_id = "broken", 10, 9

        def encode(self, text):
            return [1, -1] if text == "bad" else [1]

        def decode(self, ids):
            return ""

    with pytest.raises(DataError, match=r"document 1: token id -1 is outside the vocabulary \[0, 10\)"):
        write_indexed(tmp_path / "c", Broken(), ["good", "bad"])
    assert list(tmp_path.iterdir()) == []


def test_empty_writer_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no documents"):
        write_documents(tmp_path / "ds", [], vocab_size=100, eod_id=0)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_round_trips_unicode():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(UNICODE_TEXT)
    assert ids == list(UNICODE_TEXT.encode("utf-8"))
    np.testing.assert_array_equal(tokenizer.encode_as_array(UNICODE_TEXT), ids)
    assert tokenizer.decode(ids) == UNICODE_TEXT
    assert tokenizer.decode([*ids, tokenizer.eod_id, *ids]) == UNICODE_TEXT + "<|endoftext|>" + UNICODE_TEXT
    assert (tokenizer.vocab_size, tokenizer.eod_id) == (257, 256)


def test_byte_tokenizer_decodes_only_its_ids_and_replaces_broken_utf8():
    tokenizer = ByteTokenizer()
    for bad in ([257], [-1]):
        with pytest.raises(ValueError):
            tokenizer.decode(bad)
    assert tokenizer.decode([0xFF]) == "\ufffd"


TRAINING_TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n",
] * 20


def test_trained_bpe_round_trips_and_is_deterministic(tmp_path):
    first = train_bpe_tokenizer(iter(TRAINING_TEXTS), 400, tmp_path / "a" / "tokenizer.json")
    second = train_bpe_tokenizer(iter(TRAINING_TEXTS), 400, tmp_path / "b" / "tokenizer.json")
    first_model = json.loads((tmp_path / "a" / "tokenizer.json").read_text())["model"]
    second_model = json.loads((tmp_path / "b" / "tokenizer.json").read_text())["model"]
    assert first_model["vocab"] == second_model["vocab"]
    assert first_model["merges"] == second_model["merges"]
    assert first.name == second.name

    text = TRAINING_TEXTS[0]
    ids = first.encode(text)
    assert len(ids) < len(text.encode("utf-8")) / 2, "training learned no useful merges"
    assert first.decode(ids) == text
    # Byte-level: characters never seen in training still round-trip exactly,
    # and a literal "<|endoftext|>" in the text stays text.
    unseen = UNICODE_TEXT + " <|endoftext|>"
    assert first.eod_id not in first.encode(unseen)
    assert first.decode(first.encode(unseen)) == unseen
    assert first.decode([first.eod_id]) == "<|endoftext|>"


def test_trained_bpe_that_cannot_be_saved_is_an_os_error(tmp_path):
    """The tokenizers library raises a bare Exception; a directory is refused before training."""
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        train_bpe_tokenizer(iter(TRAINING_TEXTS), 300, tmp_path)
    with pytest.raises(OSError, match=r"cannot save the tokenizer to /proc/t\.json: No such file"):
        train_bpe_tokenizer(iter(TRAINING_TEXTS), 300, "/proc/t.json")


def save_hf_tokenizer(path: Path, special_tokens: list[str]) -> Path:
    tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, show_progress=False
    )
    tokenizer.train_from_iterator(TRAINING_TEXTS, trainer)
    tokenizer.save(str(path))
    return path


def test_hf_tokenizer_finds_eod_or_explains(tmp_path):
    with_eos = HFTokenizer(save_hf_tokenizer(tmp_path / "eos.json", ["<pad>", "</s>"]))
    assert with_eos.eod_id == 1  # "</s>", the second special token
    without_eos = save_hf_tokenizer(tmp_path / "no_eos.json", ["<pad>"])
    with pytest.raises(ValueError, match=r"no_eos\.json: no end-of-document token.*<\|endoftext\|>"):
        HFTokenizer(without_eos)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        HFTokenizer(tmp_path / "missing.json")


def word_level_tokenizer(path: Path, special_tokens: list[str], template: str | None = None,
                         vocab: dict[str, int] | None = None) -> Path:
    """A whitespace word tokenizer (a=0, b=1, <unk>=2 unless `vocab`), then the special tokens;
    `template` a post-processor such as '<s> $A </s>'."""
    vocab = vocab or {"a": 0, "b": 1, "<unk>": 2}
    tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(special_tokens)
    if template:
        tokenizer.post_processor = hf_tokenizers.processors.TemplateProcessing(
            single=template, special_tokens=[(t, tokenizer.token_to_id(t)) for t in special_tokens])
    tokenizer.save(str(path))
    return path


def test_hf_tokenizer_vocab_size_bounds_ids_with_gaps(tmp_path):
    """vocab_size is max id + 1, not the token count: a tokenizer.json whose ids skip numbers was
    refused by the writer ("id 7 ... outside the vocabulary [0, 4)")."""
    gaps = word_level_tokenizer(tmp_path / "gaps.json", ["<|endoftext|>"],  # an added token: id 3
                                vocab={"a": 0, "b": 1, "<unk>": 7})
    loaded = HFTokenizer(gaps)
    assert (loaded.vocab_size, loaded.eod_id) == (8, 3)
    assert loaded.encode("a b c") == [0, 1, 7]
    write_indexed(tmp_path / "c", loaded, ["a b c", "b"])
    assert IndexedDataset(tmp_path / "c").document(0).tolist() == [0, 1, 7, 3]


def test_hf_tokenizer_adds_no_bos_or_eos_of_its_own(tmp_path):
    """A Llama- or BERT-style tokenizer.json wraps each text in special tokens; documents are joined
    by our EOD only, so every document must not also start with <s> and end with </s>."""
    tokenizer = HFTokenizer(word_level_tokenizer(tmp_path / "t.json", ["<s>", "</s>"], template="<s> $A </s>"))
    assert tokenizer.encode("a b") == [0, 1]


def test_hf_tokenizer_prefers_endoftext_as_eod(tmp_path):
    tokenizer = HFTokenizer(word_level_tokenizer(tmp_path / "t.json", ["</s>", "<|endoftext|>"]))
    assert tokenizer.eod_id == 4  # <|endoftext|>, not </s> (3)


def test_hf_tokenizer_copy_for_a_worker_keeps_special_token_text_as_data(tmp_path):
    """Encoding workers started by spawn or forkserver get a pickled tokenizer; the Rust side drops
    `encode_special_tokens` in pickling, which made text spelling <|endoftext|> a document break
    there, so the output depended on --workers."""
    tokenizer = HFTokenizer(save_hf_tokenizer(tmp_path / "tok.json", ["<|endoftext|>"]))
    text = "a <|endoftext|> b"
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert tokenizer.eod_id not in tokenizer.encode(text)
    assert copy.encode(text) == tokenizer.encode(text)
    as_array = copy.encode_as_array(text)  # what a worker sends: 4 bytes a token
    assert as_array.dtype == np.uint32 and as_array.tolist() == tokenizer.encode(text)


def test_build_tokenizer_specs(tmp_path):
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    path = save_hf_tokenizer(tmp_path / "tok.json", ["<|endoftext|>"])
    assert isinstance(build_tokenizer(str(path)), HFTokenizer)
    saved_without_suffix = word_level_tokenizer(tmp_path / "tokenizer", ["<|endoftext|>"])
    assert isinstance(build_tokenizer(str(saved_without_suffix)), HFTokenizer)  # an existing file, any name
    with pytest.raises(ValueError, match=r"unknown tokenizer 'bpe'.*'byte', 'gpt2'.*tokenizer\.json"):
        build_tokenizer("bpe")


def test_gpt2_tokenizer_matches_reference_ids():
    try:
        tokenizer = GPT2Tokenizer()
    except FileNotFoundError as error:
        pytest.skip(f"GPT-2 ranks unavailable offline: {error}")
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode(" the") == [262]
    assert (tokenizer.vocab_size, tokenizer.eod_id) == (50257, 50256)
    assert tokenizer.decode(tokenizer.encode(UNICODE_TEXT)) == UNICODE_TEXT
    assert 50256 not in tokenizer.encode("a <|endoftext|> b")


def test_gpt2_tokenizer_missing_ranks_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_UNIPOOL_GPT2_RANKS", str(tmp_path / "absent.tiktoken"))
    with pytest.raises(FileNotFoundError, match=r"absent\.tiktoken.*pip install --no-deps openai-whisper"):
        GPT2Tokenizer()


def test_read_and_write_reports_count_megabytes_of_10_6_bytes():
    """The progress lines' MB are 10^6 bytes (as the rates' MB/s), not MiB."""
    assert str(ReadStats(3, 1, 2_000_000, 1.5)) == (
        "3 documents, 2.00 MB of text, in 1.5 s; skipped 1 blank document")
    assert str(corpus_module.WriteStats(3, 40, 2_000_000, 0.5)) == (
        "3 documents, 40 tokens, 2.00 MB of text in 0.50 s (4.0 MB/s)")


def test_gpt2_tokenizer_refuses_a_ranks_file_missing_its_last_rank(tmp_path, monkeypatch):
    """A truncated copy (a copy cut short) would encode text under the name gpt2, sharing the real
    vocabulary's cached corpora, with one id less."""
    from megatron_unipool.data.tokenizers import _find_gpt2_ranks

    monkeypatch.delenv("MEGATRON_UNIPOOL_GPT2_RANKS", raising=False)
    try:
        lines = _find_gpt2_ranks().read_bytes().splitlines(keepends=True)
    except FileNotFoundError as error:
        pytest.skip(f"GPT-2 ranks unavailable offline: {error}")
    (tmp_path / "short.tiktoken").write_bytes(b"".join(lines[:-1]))
    monkeypatch.setenv("MEGATRON_UNIPOOL_GPT2_RANKS", str(tmp_path / "short.tiktoken"))
    with pytest.raises(DataError, match=rf"short\.tiktoken: holds {len(lines) - 1} ranks, GPT-2 has {len(lines)}"):
        GPT2Tokenizer()


# ------------------------------------------------------------------ samples


@pytest.fixture
def sample_source(tmp_path):
    """An indexed dataset plus its token stream, rebuilt here from the documents."""
    documents = random_documents(np.random.default_rng(1), vocab_size=500, eod_id=499, count=30)
    write_documents(tmp_path / "ds", documents, vocab_size=500, eod_id=499)
    return IndexedDataset(tmp_path / "ds"), flat_stream(documents, 499)


def test_samples_are_shifted_windows_of_the_stream(sample_source):
    dataset, stream = sample_source
    seq_len = 7
    samples = TokenSampleDataset(dataset, seq_len=seq_len, seed=0, unshuffled=True)
    assert len(samples) == (len(stream) - 1) // seq_len
    for g in range(2 * len(samples)):
        window = g % len(samples)
        np.testing.assert_array_equal(
            samples.sample(g), stream[window * seq_len : (window + 1) * seq_len + 1]
        )
    batch = samples.batch(3, 4)
    assert batch.dtype == torch.int64 and batch.shape == (4, seq_len + 1)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    np.testing.assert_array_equal(inputs[0].numpy(), stream[3 * seq_len : 4 * seq_len])
    np.testing.assert_array_equal(labels[0].numpy(), stream[3 * seq_len + 1 : 4 * seq_len + 1])
    # Neighbouring windows share one token, so every token but the first is a label once.
    assert batch[0, -1] == batch[1, 0]


def test_each_epoch_is_a_fresh_permutation_of_all_windows(sample_source):
    dataset, stream = sample_source
    seq_len = 5
    samples = TokenSampleDataset(dataset, seq_len=seq_len, seed=123)
    n = len(samples)
    windows = {tuple(stream[w * seq_len : (w + 1) * seq_len + 1]): w for w in range(n)}
    assert len(windows) == n, "test stream should have distinct windows"
    epoch_orders = [[windows[tuple(samples.sample(e * n + j))] for j in range(n)] for e in range(3)]
    for order in epoch_orders:
        assert sorted(order) == list(range(n))
        assert order != list(range(n))
    assert epoch_orders[0] != epoch_orders[1] != epoch_orders[2]


def test_resuming_from_a_sample_offset_reproduces_batches(sample_source):
    dataset, _ = sample_source
    batch_size, num_batches, resume_at = 6, 40, 17  # 40 * 6 samples span several epochs
    uninterrupted = TokenSampleDataset(dataset, seq_len=8, seed=7)
    assert batch_size * num_batches > 2 * len(uninterrupted)
    reference = [uninterrupted.batch(b * batch_size, batch_size) for b in range(num_batches)]
    resumed = TokenSampleDataset(dataset, seq_len=8, seed=7)
    for b in range(resume_at, num_batches):
        assert torch.equal(resumed.batch(b * batch_size, batch_size), reference[b]), f"batch {b} differs"


def test_seeds_give_different_orders(sample_source):
    dataset, _ = sample_source
    orders = [TokenSampleDataset(dataset, seq_len=8, seed=seed).batch(0, 20) for seed in (0, 1)]
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(TokenSampleDataset(dataset, seq_len=8, seed=0).batch(0, 20), orders[0])


def test_sample_order_is_the_documented_function_of_seed_and_epoch(sample_source):
    """Window of global sample g = permutation(default_rng([seed, g // n]))[g % n] (samples.py). A
    checkpoint stores only the samples consumed, so a changed order would resume on other data."""
    dataset, _ = sample_source
    samples = TokenSampleDataset(dataset, seq_len=5, seed=7)
    n = len(samples)
    for g in range(3 * n):
        epoch, position = divmod(g, n)
        assert samples.window_index(g) == np.random.default_rng([7, epoch]).permutation(n)[position]


def test_sample_arguments_are_checked(sample_source):
    dataset, _ = sample_source
    with pytest.raises(ValueError, match="seq_len"):
        TokenSampleDataset(dataset, seq_len=0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        TokenSampleDataset(dataset, seq_len=2, seed=-1, unshuffled=True)
    for unshuffled in (False, True):  # -1 would silently read the last window
        with pytest.raises(IndexError):
            TokenSampleDataset(dataset, seq_len=2, seed=0, unshuffled=unshuffled).sample(-1)
    with pytest.raises(ValueError, match="batch_size"):
        TokenSampleDataset(dataset, seq_len=2, seed=0).batch(0, 0)


def test_a_token_id_outside_the_vocabulary_is_named_where_it_is_read(sample_source):
    """A damaged .bin (an id the index's vocabulary does not hold) fails in the window reading it, naming the
    file, instead of as an embedding lookup's device-side assert; the other windows read as before."""
    dataset, stream = sample_source
    damaged_at = 100
    raw = np.fromfile(dataset.bin_path, dtype=dataset.dtype)
    raw[damaged_at] = dataset.vocab_size  # the first id outside [0, vocab_size)
    raw.tofile(dataset.bin_path)
    samples = TokenSampleDataset(IndexedDataset(dataset.bin_path.with_suffix("")), seq_len=7, seed=0, unshuffled=True)
    for window in range(len(samples)):
        if window * 7 <= damaged_at <= window * 7 + 7:
            with pytest.raises(DataError, match=rf"ds\.bin: token id 500 in tokens \[{window * 7}, {window * 7 + 8}\)"
                                                r" is outside the vocabulary \[0, 500\)"):
                samples.sample(window)
        else:
            np.testing.assert_array_equal(samples.sample(window), stream[window * 7: window * 7 + 8])


def test_too_short_stream_is_an_error(small_dataset_prefix):
    dataset = IndexedDataset(small_dataset_prefix)  # 9 tokens
    with pytest.raises(ValueError, match=r"9 tokens.*seq_len=9"):
        TokenSampleDataset(dataset, seq_len=9, seed=0)
    only_sample = TokenSampleDataset(dataset, seq_len=8, seed=0)
    assert len(only_sample) == 1
    np.testing.assert_array_equal(only_sample.sample(5), [1, 2, 3, 0, 4, 5, 0, 6, 0])


# ------------------------------------------------------------------ blends


@pytest.fixture
def blend_files(tmp_path):
    """Three files of 30, 8 and 60 documents: samples of 6 tokens, shuffled, as training reads them."""
    rng = np.random.default_rng(3)
    sources = []
    for name, count in (("web", 30), ("code", 8), ("books", 60)):
        write_documents(tmp_path / name, random_documents(rng, 500, 499, count), vocab_size=500, eod_id=499)
        sources.append((name, TokenSampleDataset(IndexedDataset(tmp_path / name), seq_len=6, seed=5)))
    return sources


def reference_order(shares: list[int]) -> list[tuple[int, int]]:
    """(source, its sample within the period) at each position of a period: the documented rule, in exact
    fractions: source i's j-th sample at (j + 1/2) / share_i of the period, ties to the source listed first."""
    events = [(Fraction(2 * j + 1, 2 * share), source, j) for source, share in enumerate(shares) for j in range(share)]
    return [(source, j) for _, source, j in sorted(events)]


@pytest.mark.parametrize("weights, period", [([0.7, 0.3], 10), ([1, 1, 1], 10), ([5, 2, 1.5], 97),
                                             ([1e-3, 1, 0.2], 4096), ([0.1] * 7, 1 << 16), ([1] * 6, 1 << 16),
                                             ([1, 2] * 9, 1 << 16), ([1e308, 1e308, 5e307], 1 << 16)])
def test_period_shares_round_the_weights_by_largest_remainder(weights, period):
    """Rounded down, then one each to the largest remainders; ties (18 sources of two weights) to the first
    source; weights whose sum is past a float's range (1e308) as their proportions."""
    exact = [Fraction(w) / sum(map(Fraction, weights)) * period for w in weights]
    floors = [math.floor(e) for e in exact]
    # the rest of the period one each to the largest remainders, ties to the first source
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - floors[i]), i))
    expected = [f + (i in by_remainder[: period - sum(floors)]) for i, f in enumerate(floors)]
    assert period_shares(weights, period).tolist() == expected
    assert sum(expected) == period


@pytest.mark.parametrize("weights, period", [([5, 2, 1.5], 97), ([0.6, 0.3, 0.1], 1000), ([1, 1, 1], 64)])
def test_a_blend_deals_each_period_by_the_documented_rule(blend_files, weights, period):
    blend = BlendedSamples([(name, samples, w) for (name, samples), w in zip(blend_files, weights)], period=period)
    shares = blend.shares.tolist()
    order = reference_order(shares)
    seen = [0] * len(shares)
    for g in range(3 * period + 5):
        periods, position = divmod(g, period)
        source, j = order[position]
        assert blend.locate(g) == (source, periods * shares[source] + j)
        # each source reads its own samples once each, in order: a blend never skips or repeats one
        assert blend.locate(g)[1] == seen[source]
        seen[source] += 1
        np.testing.assert_array_equal(blend.sample(g), blend_files[source][1].sample(seen[source] - 1))
        for other, share in enumerate(shares):
            assert blend.source_samples(other, g + 1) == seen[other]


@pytest.mark.parametrize("weights", [[1, 1], [0.7, 0.2, 0.1], [1] * 7, [1000] + [1] * 7, [1, 2] * 9,
                                     np.random.default_rng(0).dirichlet([1.0] * 12).tolist()])
def test_every_stretch_of_a_blend_holds_each_share_to_the_documented_bound(blend_files, weights):
    """The first n samples of a period hold n * share / period of a source's, give or take
    1/2 + (K - 2) / 2 * share / period for K sources (blending.py): a stretch, twice that."""
    period = 1 << 16
    blend = BlendedSamples([(f"source {i}", blend_files[0][1], weight) for i, weight in enumerate(weights)])
    shares = blend.shares
    dealt = np.array([blend.locate(g)[0] for g in range(period)])
    for index, share in enumerate(shares):
        counts = np.concatenate([[0], np.cumsum(dealt == index)])
        off = counts - np.arange(period + 1) * share / period
        bound = 0.5 + (len(shares) - 2) / 2 * share / period
        assert np.abs(off).max() <= bound + 1e-9 and off.max() - off.min() <= 2 * bound + 1e-9
        assert off[-1] == 0  # a period holds the share exactly


def test_a_blends_length_ends_where_a_source_would_repeat(blend_files):
    weights = [1, 4, 1]  # the 8-document file, weighted high, runs out first
    blend = BlendedSamples([(name, samples, w) for (name, samples), w in zip(blend_files, weights)], period=30)
    g = 0  # the first global sample that reads a source's sample past its last one
    while blend.locate(g)[1] < len(blend_files[blend.locate(g)[0]][1]):
        g += 1
    assert len(blend) == g and blend.locate(g)[0] == 1 and blend.locate(g)[1] == len(blend_files[1][1])
    batch = blend.batch(7, 5)
    assert batch.shape == (5, 7) and all(np.array_equal(batch[i].numpy(), blend.sample(7 + i)) for i in range(5))


def test_a_blend_refuses_what_it_cannot_deal(blend_files, tmp_path):
    (web, web_samples), (code, code_samples) = blend_files[:2]
    with pytest.raises(DataError, match=r"^code's weight 2e-05 is 1e-05 of the blend, less than one sample in 1,000:"
                                        " raise it or leave the source out"):
        BlendedSamples([(web, web_samples, 2.0), (code, code_samples, 2e-5)], period=1000)
    longer = TokenSampleDataset(IndexedDataset(tmp_path / "code"), seq_len=7, seed=5)
    with pytest.raises(DataError, match=r"one sample length, got \[6, 7\]"):
        BlendedSamples([(web, web_samples, 1.0), (code, longer, 1.0)])
    with pytest.raises(DataError, match="at least one source"):
        BlendedSamples([])
    with pytest.raises(IndexError, match="-1"):
        BlendedSamples([(web, web_samples, 1.0), (code, code_samples, 1.0)]).sample(-1)


# ------------------------------------------------------------------ default corpus


@pytest.fixture(scope="module")
def shakespeare():
    return shakespeare_documents()


def test_corpus_files_are_plain_text_without_licence_boilerplate(shakespeare):
    assert len(shakespeare) == 77  # 78 files minus metadata.txt
    names = [name for name, _ in shakespeare]
    assert names == sorted(names) and "metadata" not in names
    licence_markers = ("gutenberg", "*** start of", "*** end of", "this etext", "copyright")
    for name, text in shakespeare:
        assert not [marker for marker in licence_markers if marker in text.lower()], name
    texts = dict(shakespeare)
    assert texts["hamlet_gut"].startswith("HAMLET, PRINCE OF DENMARK\n")
    assert texts["hamlet_gut_f"].startswith("The Tragedie of Hamlet\n")


def test_validation_split_holds_out_whole_plays(shakespeare):
    train, valid = split_shakespeare(shakespeare)
    train_names, valid_names = {name for name, _ in train}, {name for name, _ in valid}
    assert not train_names & valid_names
    assert train_names | valid_names == {name for name, _ in shakespeare}
    assert len(train) + len(valid) == len(shakespeare)
    assert valid_names == {
        "comedy_of_errors_gut",
        "comedy_of_errours_gut_f",
        "macbeth_gut",
        "macbeth_gut_f",
        "tempest_gut",
        "tempest_gut_f",
    }
    assert not {play_of(name) for name in train_names} & set(VALIDATION_PLAYS)
    valid_share = sum(len(text) for _, text in valid) / sum(len(text) for _, text in shakespeare)
    assert 0.05 < valid_share < 0.08


def test_every_folio_text_pairs_with_its_modern_edition(shakespeare):
    modern = {play_of(name) for name, _ in shakespeare if name.endswith("_gut")}
    folio = {play_of(name) for name, _ in shakespeare if name.endswith("_gut_f")}
    assert len(folio) == sum(name.endswith("_gut_f") for name, _ in shakespeare) == 35
    assert folio <= modern, f"Folio texts with no modern partner: {sorted(folio - modern)}"
    assert play_of("twelfe-night_gut_f") == play_of("twelfth_night_gut") == "twelfth_night"
    with pytest.raises(ValueError, match="metadata"):
        play_of("metadata")


def test_prepare_default_corpus_is_cached_and_decodes_to_source(tmp_path, shakespeare, capsys):
    train_prefix, valid_prefix = prepare_default_corpus("byte", tmp_path)
    assert capsys.readouterr().out.count("documents") == 2  # one line per split
    files = [
        Path(f"{prefix}{suffix}") for prefix in (train_prefix, valid_prefix) for suffix in (".bin", ".idx")
    ]
    stamps = [path.stat().st_mtime_ns for path in files]

    assert prepare_default_corpus("byte", tmp_path) == (train_prefix, valid_prefix)
    assert [path.stat().st_mtime_ns for path in files] == stamps
    assert capsys.readouterr().out == ""

    tokenizer = ByteTokenizer()
    for prefix, documents in zip((train_prefix, valid_prefix), split_shakespeare(shakespeare), strict=True):
        dataset = IndexedDataset(prefix)
        assert dataset.num_documents == len(documents)
        for index, (name, text) in enumerate(documents):
            assert tokenizer.decode(dataset.document(index)[:-1]) == text, name


def test_content_hash_is_the_same_for_copies_and_differs_for_other_text(tmp_path):
    """What the ranks compare of node-local files: a copy hashes alike; one changed token where the tokens
    are sampled (start, middle, end) does not, nor a document boundary moved between those samples (seen
    only in the offsets)."""
    documents = [[6] * 5000, [6] * 5000, [6] * 5000]
    hashes = []
    for name, docs in (("a", documents), ("copy", documents), ("token", [[7] + [6] * 4999, [6] * 5000, [6] * 5000]),
                       ("boundary", [[6] * 4999, [6] * 5001, [6] * 5000])):
        write_documents(tmp_path / name, docs, vocab_size=10, eod_id=9)
        hashes.append(IndexedDataset(tmp_path / name).content_hash())
    assert hashes[0] == hashes[1] and len(set(hashes)) == 3


def test_a_prepared_corpus_is_read_without_writing_to_its_cache(tmp_path, monkeypatch):
    """A cache prepared once and shared read-only with compute nodes: whole files are used without the
    builders' lock file (which needs write access); a damaged one still takes the lock to be rebuilt."""
    train_prefix, valid_prefix = prepare_default_corpus("byte", tmp_path)
    lock = tmp_path / "shakespeare_byte.lock"
    lock.unlink()
    def read_only(path):
        raise OSError(30, "Read-only file system", str(path))
    monkeypatch.setattr(corpus_module, "_exclusive_lock", read_only)
    assert prepare_default_corpus("byte", tmp_path) == (train_prefix, valid_prefix)
    assert not lock.exists()
    Path(f"{valid_prefix}.bin").write_bytes(b"")
    with pytest.raises(OSError, match="Read-only"):
        prepare_default_corpus("byte", tmp_path)


def test_prepare_default_corpus_rebuilds_a_readable_file_of_other_documents(tmp_path):
    """A cached file that reads cleanly but holds another document set (a stale split) is rebuilt: written by the
    same tokenizer, so that only the document count tells them apart."""
    train_prefix, _ = prepare_default_corpus("byte", tmp_path)
    write_documents(train_prefix, [[1, 2]], vocab_size=257, eod_id=256, tokenizer="byte")
    prepare_default_corpus("byte", tmp_path)
    assert len(IndexedDataset(train_prefix)) == len(split_shakespeare(shakespeare_documents())[0])


def test_a_validation_play_missing_an_edition_is_refused(shakespeare):
    """Each held-out play must leave training in both editions, or its twin leaks into training."""
    with pytest.raises(ValueError, match="macbeth"):
        split_shakespeare([document for document in shakespeare if document[0] != "macbeth_gut_f"])


@pytest.mark.parametrize("documents, fraction, held_out", [(10, 0.7, 7), (100, 0.07, 7), (10, 1e-12, 1),
                                                           (10, 0.0, 0)])
def test_holdout_is_the_ceiling_of_the_fraction_without_float_noise(documents, fraction, held_out):
    """ceil(0.7 * 10) must be 7, not 8 (0.7 * 10 = 7.000000000000001); any positive fraction holds one out."""
    assert holdout_count(documents, fraction) == held_out


@pytest.mark.parametrize("fraction", [1.0, -0.1, float("nan")])
def test_holdout_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(DataError, match=r"valid_fraction must be in \[0, 1\)"):
        holdout_count(10, fraction)


def test_prepare_default_corpus_rebuilds_damaged_files(tmp_path):
    train_prefix, _ = prepare_default_corpus("byte", tmp_path)
    bin_path = Path(f"{train_prefix}.bin")
    expected = bin_path.read_bytes()
    bin_path.write_bytes(expected[: len(expected) // 2])
    prepare_default_corpus("byte", tmp_path)
    assert bin_path.read_bytes() == expected


def test_concurrent_prepares_agree(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=prepare_default_corpus, args=("byte", tmp_path)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"
    train_prefix, valid_prefix = prepare_default_corpus("byte", tmp_path)
    assert IndexedDataset(train_prefix).num_documents + IndexedDataset(valid_prefix).num_documents == 77


# ------------------------------------------------------------------ preprocess_data CLI


PREPROCESS_SCRIPT = REPO_ROOT / "tools" / "preprocess_data.py"


def run_preprocess(*args: str) -> subprocess.CompletedProcess:
    """The real command line; each run pays a fresh interpreter's torch import (~3 s)."""
    return subprocess.run(
        [sys.executable, str(PREPROCESS_SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def preprocess_main():
    """The tool's ``main(argv)`` in-process, for cases that need no fresh interpreter."""
    return load_script(PREPROCESS_SCRIPT).main


def decoded_documents(prefix, tokenizer) -> list[str]:
    dataset = IndexedDataset(prefix)
    assert (dataset.vocab_size, dataset.eod_id) == (tokenizer.vocab_size, tokenizer.eod_id)
    return [tokenizer.decode(dataset.document(i)[:-1]) for i in range(len(dataset))]


def test_cli_jsonl_with_validation_split(tmp_path):
    texts = [f"document {i}: {UNICODE_TEXT * (i + 1)}" for i in range(9)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "body": text}) + "\n" for i, text in enumerate(texts)))
    result = run_preprocess(
        "--input", str(corpus), "--json-key", "body", "--output-prefix", str(tmp_path / "out" / "c"),
        "--tokenizer", "byte", "--valid-fraction", "0.2", "--workers", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "7 documents" in result.stdout and "2 documents" in result.stdout
    assert "  read " not in result.stdout  # one input: no line of its own
    # ceil(0.2 * 9) = 2 trailing documents are held out.
    assert decoded_documents(tmp_path / "out" / "c_train", ByteTokenizer()) == texts[:7]
    assert decoded_documents(tmp_path / "out" / "c_valid", ByteTokenizer()) == texts[7:]


def test_cli_reads_several_inputs_as_one_corpus_in_the_order_given(tmp_path):
    """A corpus's shards: their documents in the order of the inputs, the held-out ones the last of all."""
    shards = [[f"shard {s} document {i}: {UNICODE_TEXT * i}" for i in range(count)] for s, count in enumerate((3, 1, 4))]
    paths = [tmp_path / f"shard{s}.jsonl" for s in (2, 0, 1)]  # the order given, not the names' order
    for path, texts in zip(paths, shards):
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    result = run_preprocess("--input", *map(str, paths), "--output-prefix", str(tmp_path / "c"), "--tokenizer", "byte",
                            "--valid-fraction", "0.3")
    assert result.returncode == 0, result.stderr
    everything = sum(shards, [])
    assert decoded_documents(tmp_path / "c_train", ByteTokenizer()) == everything[:5]  # ceil(0.3 * 8) = 3 held out
    assert decoded_documents(tmp_path / "c_valid", ByteTokenizer()) == everything[5:]
    assert "reading 3 inputs ..." in result.stdout and f"  read {paths[1]}: 1 documents" in result.stdout
    assert "read 3 inputs: 8 documents" in result.stdout
    # --input given once per file reads them all too; a shard with no document is noted, not refused
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = run_preprocess("--input", str(paths[0]), "--input", str(empty), str(paths[1]), "--output-prefix",
                            str(tmp_path / "e"), "--tokenizer", "byte")
    assert result.returncode == 0, result.stderr
    assert decoded_documents(tmp_path / "e", ByteTokenizer()) == shards[0] + shards[1]
    assert f"  read {empty}: 0 documents, 0.00 MB of text" in result.stdout and "; note: no (non-blank) document" in result.stdout
    empty.with_name("empty2.jsonl").write_text(json.dumps({"text": " "}) + "\n")  # a blank document only
    result = run_preprocess("--input", str(empty), str(empty.with_name("empty2.jsonl")), "--output-prefix",
                            str(tmp_path / "f"), "--tokenizer", "byte")
    assert result.returncode == 1 and "the 2 inputs contain no (non-blank) documents" in result.stderr
    # a bad line in a later input is named there, before anything is written
    paths[2].write_text('{"text": "fine"}\n{"body": "no text"}\n')
    result = run_preprocess("--input", *map(str, paths), "--output-prefix", str(tmp_path / "d"), "--tokenizer", "byte")
    assert result.returncode == 1 and "shard1.jsonl:2: missing key 'text'" in result.stderr
    assert not list(tmp_path.glob("d*"))


def test_cli_txt_trains_tokenizer_and_splits_on_blank_lines(tmp_path):
    blocks = ["First block,\nover two lines.", "Second block " + UNICODE_TEXT, "Third."]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(blocks[:2]) + "\n \n\n" + blocks[2])
    tokenizer_path = tmp_path / "tok" / "tokenizer.json"
    result = run_preprocess(
        "--input", str(corpus), "--split-on-blank-lines", "--output-prefix", str(tmp_path / "c"),
        "--train-tokenizer-vocab", "300", "--tokenizer-output", str(tokenizer_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert decoded_documents(tmp_path / "c", HFTokenizer(tokenizer_path)) == blocks


def test_cli_reports_bad_jsonl_line_and_writes_nothing(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "fine"}\n')
    result = run_preprocess(
        "--input", str(corpus), "--output-prefix", str(tmp_path / "c"), "--tokenizer", "byte"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("preprocess_data: error:") and "corpus.jsonl:3: invalid JSON" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_progress_lines_say_how_much_is_done_and_when_it_ends(tmp_path, capsys):
    """report_every_s=0 reports after every document: the count, its share of the expected total, and
    with an InputProgress the share of the whole input's text and an ETA (0 once all is written), counted
    on over the splits written from that input; without them, the plain counts only."""
    progress = InputProgress(total_bytes=12)
    write_indexed(tmp_path / "c", ByteTokenizer(), ["ab", "cd", "ef", "gh"], report_every_s=0.0, expected_documents=4,
                  input_progress=progress)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert "| 1/4 documents (25.0%) | 16.7% of the input's text, ETA " in lines[0]
    assert progress.done_bytes == 8 and lines[-1].endswith("| 4/4 documents (100.0%) | 66.7% of the input's text, ETA "
                                                         + lines[-1].rsplit("ETA ", 1)[1])
    write_indexed(tmp_path / "v", ByteTokenizer(), ["ij", "kl"], report_every_s=0.0, expected_documents=2,
                  input_progress=progress)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| 1/2 documents (50.0%) | 83.3% of the input's text, ETA " + lines[0].rsplit("ETA ", 1)[1])
    assert lines[1].endswith("| 2/2 documents (100.0%) | 100.0% of the input's text, ETA 0:00:00")
    write_indexed(tmp_path / "d", ByteTokenizer(), ["ab"], report_every_s=0.0)
    assert "documents (" not in capsys.readouterr().out


def test_progress_is_reported_at_most_every_report_every_s(tmp_path, capsys, monkeypatch):
    """A clock that moves 1 s per document, reports every 2.5 s: after documents 3, 6 and 9 only. At document
    3 (3 s since the start), 10 of 16 bytes are done: ETA 1.8 s, not the 6 s that 6 documents to go at 1 s
    each would say; a long first document is no reason to expect every later one to be as long."""
    import itertools

    from megatron_unipool.data import corpus

    clock = itertools.count(0.0, 1.0)
    monkeypatch.setattr(corpus.time, "perf_counter", lambda: next(clock))
    write_indexed(tmp_path / "c", ByteTokenizer(), ["a" * 8] + ["a"] * 8, report_every_s=2.5, expected_documents=9,
                  input_progress=InputProgress(total_bytes=16, started=0.0))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].endswith("| 3/9 documents (33.3%) | 62.5% of the input's text, ETA 0:00:02")
    assert "| 6/9 documents" in lines[1] and "| 9/9 documents" in lines[2]


def test_workers_keep_document_order_and_bytes_count_utf8(tmp_path):
    """Uneven document sizes make a process pool finish out of order; the file must not."""
    documents = ["x" * (5000 if i % 7 == 0 else 1) + f"é{i}" for i in range(300)]
    stats = write_indexed(tmp_path / "c", ByteTokenizer(), documents, workers=2)
    assert decoded_documents(tmp_path / "c", ByteTokenizer()) == documents
    assert stats.text_bytes == sum(len(d.encode("utf-8")) for d in documents)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        write_indexed(tmp_path / "d", ByteTokenizer(), ["a"], workers=0)


def test_jsonl_lines_that_are_not_text_objects_are_named(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n{"text": "  \\n"}\n')
    assert list(read_documents(corpus)) == ["a"]  # a whitespace-only text is a blank document
    for line, error in [("[1]", "c.jsonl:1: expected a JSON object"), ('{"text": 5}', "holds int, expected a string"),
                        ("[" * 100_000 + "]" * 100_000, "c.jsonl:1: JSON nested too deeply to read")]:
        corpus.write_text(line + "\n")
        with pytest.raises(ValueError, match=error):
            list(read_documents(corpus))
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(ValueError, match=r"c.csv: unsupported input type; expected a file ending in .txt, .jsonl,"
                                         r" .jsonl.gz, .jsonl.zst, .parquet"):
        read_documents(tmp_path / "c.csv")


JSONL = '{"text": "First document."}\n{"text": ""}\n{"id": 3, "text": "Dritte, \\u00fcber Zeilen\\nhinweg."}\n'


def test_compressed_json_lines_read_as_the_plain_file(tmp_path):
    """The Pile's .jsonl.zst and a .jsonl.gz stream out the documents of the plain .jsonl, counted alike; a
    damaged or truncated one is a DataError naming it, not a decompressor's traceback."""
    import gzip

    import zstandard

    plain = tmp_path / "c.jsonl"
    plain.write_text(JSONL)
    expected = list(read_documents(plain))
    assert expected == ["First document.", "Dritte, über Zeilen\nhinweg."]
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(JSONL.encode()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(JSONL.encode()))
    for name in ("c.jsonl.gz", "c.jsonl.zst"):
        assert list(read_documents(tmp_path / name)) == expected
        counted, plain_counted = count_documents(tmp_path / name), count_documents(plain)
        assert (counted.documents, counted.blank_documents, counted.text_bytes) == (
            2, 1, plain_counted.text_bytes)
        whole = (tmp_path / name).read_bytes()
        for damaged, bytes_ in (("truncated", whole[: len(whole) // 2]), ("garbled", b"not compressed at all")):
            broken = tmp_path / f"{damaged}.{name}"
            broken.write_bytes(bytes_)
            with pytest.raises(DataError, match=f"{damaged}.{name}: cannot be decompressed"):
                list(read_documents(broken))
    corrupted = bytearray(gzip.compress(JSONL.encode() * 3, mtime=0))
    corrupted[len(corrupted) // 2] ^= 0xFF  # inside the deflate stream: zlib's own error, not an OSError
    (tmp_path / "corrupted.jsonl.gz").write_bytes(bytes(corrupted))
    with pytest.raises(DataError, match="corrupted.jsonl.gz: cannot be decompressed"):
        list(read_documents(tmp_path / "corrupted.jsonl.gz"))
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n[2]\n'))
    with pytest.raises(DataError, match=r"bad.jsonl.gz:2: expected a JSON object"):
        list(read_documents(tmp_path / "bad.jsonl.gz"))


def test_parquet_rows_are_documents_of_the_named_column(tmp_path):
    """Hugging Face datasets ship Parquet: each row's `text` (or --json-key's column) is a document, a null one
    blank; a missing column, a column of numbers or a file that is not Parquet is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["First document.", None, "", "Dritte, über Zeilen\nhinweg."] + [f"row {i}" for i in range(3000)]
    table = pa.table({"id": list(range(len(texts))), "text": texts, "body": [t and t.upper() for t in texts]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=1000)  # several row groups
    expected = [t for t in texts if t]
    assert list(read_documents(tmp_path / "c.parquet")) == expected
    assert list(read_documents(tmp_path / "c.parquet", json_key="body")) == [t.upper() for t in expected]
    stats = count_documents(tmp_path / "c.parquet")
    assert (stats.documents, stats.blank_documents) == (len(expected), 2)
    for key, message in (("missing", r"c.parquet: no column 'missing' \(columns: \['id', 'text', 'body'\]\)"),
                         ("id", "c.parquet: column 'id' holds int64, expected strings")):
        with pytest.raises(DataError, match=message):
            list(read_documents(tmp_path / "c.parquet", json_key=key))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="fake.parquet: not a readable Parquet file"):
        list(read_documents(tmp_path / "fake.parquet"))
    # a pandas categorical: dictionary-encoded, the same strings
    pq.write_table(pa.table({"text": pa.array(expected).dictionary_encode()}), tmp_path / "categorical.parquet")
    assert list(read_documents(tmp_path / "categorical.parquet")) == expected
    # damaged data pages behind an intact footer: named, with the rows read before
    pq.write_table(pa.table({"text": [f"row {i} " + "abc" * (i % 13) for i in range(3000)]}), tmp_path / "g.parquet",
                   row_group_size=500, compression="snappy")
    whole = (tmp_path / "g.parquet").read_bytes()
    named = 0
    for position in range(4, len(whole) - 600, 97):  # one byte flipped in the data pages (not the footer)
        damaged = bytearray(whole)
        damaged[position] ^= 0xFF
        (tmp_path / "damaged.parquet").write_bytes(bytes(damaged))
        try:  # a flipped character inside a string reads as another text (Parquet pages carry no checksum here)
            list(read_documents(tmp_path / "damaged.parquet"))
        except DataError as error:  # anything else (pyarrow's own errors, a UnicodeDecodeError) fails the test
            named += str(error).startswith(f"{tmp_path / 'damaged.parquet'}: ")
    assert named > 20


def test_a_format_whose_package_is_missing_says_which_to_install(tmp_path, monkeypatch):
    for module in ("zstandard", "pyarrow", "pyarrow.parquet"):  # None in sys.modules: its import fails
        monkeypatch.setitem(sys.modules, module, None)
    for name, package in (("c.jsonl.zst", "zstandard"), ("c.parquet", "pyarrow")):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(DataError, match=f"{name}: reading it needs the {package} package"):
            list(read_documents(tmp_path / name))


def test_blank_lines_split_crlf_text_too(tmp_path):
    """Windows (CRLF) line ends: their blank lines split documents too, as LF ones do."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"First block,\r\nover two lines.\r\n\r\nSecond.\r\n \t\r\n\r\nThird.\n\nFourth.\r\n")
    documents = list(read_documents(corpus, split_on_blank_lines=True))
    assert documents == ["First block,\r\nover two lines.", "Second.", "Third.", "Fourth.\r\n"]


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Editors on Windows start UTF-8 files with U+FEFF: neither a .txt nor a .jsonl keeps it."""
    (tmp_path / "c.txt").write_bytes(b"\xef\xbb\xbfFirst.\n\nSecond.\n")
    assert list(read_documents(tmp_path / "c.txt", split_on_blank_lines=True)) == ["First.", "Second.\n"]
    (tmp_path / "c.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert list(read_documents(tmp_path / "c.jsonl")) == ["a", "b"]


def test_blank_documents_are_counted_and_an_input_directory_is_named(tmp_path):
    """count_documents counts what read_documents yields and the blank documents it skips; the empty
    blocks a blank-line run at the start or end of a file leaves are no documents."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n{"text": ""}\n\n{"text": " \\n\\t"}\n{"text": "bé"}\n')
    stats = count_documents(corpus)
    assert (stats.documents, stats.blank_documents, stats.text_bytes) == (2, 2, 4)
    assert list(read_documents(corpus)) == ["a", "bé"]
    assert "skipped 2 blank documents" in str(stats)
    (tmp_path / "c.txt").write_text("\n\nFirst.\n\nSecond.\n\n")
    assert count_documents(tmp_path / "c.txt", split_on_blank_lines=True).blank_documents == 0
    with pytest.raises(IsADirectoryError, match="input .* is a directory; expected a file ending in .txt, .jsonl"):
        count_documents(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_documents(tmp_path)


def test_cli_txt_is_one_document(tmp_path, preprocess_main):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Para one.\n\nPara two.\n")
    preprocess_main(["--input", str(corpus), "--output-prefix", str(tmp_path / "c"), "--tokenizer", "byte"])
    assert decoded_documents(tmp_path / "c", ByteTokenizer()) == ["Para one.\n\nPara two.\n"]


def test_cli_reads_compressed_json_lines_and_parquet_shards_as_one_corpus(tmp_path, preprocess_main):
    """Shards of one corpus in the three container formats (The Pile's .jsonl.zst, a .jsonl.gz, a Hugging Face
    dataset's Parquet) give the files the same documents as plain .jsonl shards; --json-key names the column."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [f"document {i}: {UNICODE_TEXT * (i % 3 + 1)}" for i in range(12)]
    shards = [texts[:4], texts[4:8], texts[8:]]
    lines = ["".join(json.dumps({"body": text}) + "\n" for text in shard).encode() for shard in shards]
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[0]))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines[1]))
    pq.write_table(pa.table({"body": shards[2]}), tmp_path / "c.parquet")
    for name, content in zip(("a", "b", "c"), lines):
        (tmp_path / f"plain_{name}.jsonl").write_bytes(content)
    for inputs, prefix in ((["a.jsonl.zst", "b.jsonl.gz", "c.parquet"], "packed"),
                           (["plain_a.jsonl", "plain_b.jsonl", "plain_c.jsonl"], "plain")):
        preprocess_main(["--input", *(str(tmp_path / name) for name in inputs), "--json-key", "body",
                         "--output-prefix", str(tmp_path / prefix), "--tokenizer", "byte", "--valid-fraction", "0.25"])
    for split in ("_train", "_valid"):
        assert decoded_documents(tmp_path / f"packed{split}", ByteTokenizer()) == decoded_documents(
            tmp_path / f"plain{split}", ByteTokenizer())
    assert decoded_documents(tmp_path / "packed_valid", ByteTokenizer()) == texts[9:]


def test_cli_holds_out_a_single_document(tmp_path, preprocess_main):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(10)))
    preprocess_main(["--input", str(corpus), "--output-prefix", str(tmp_path / "c"), "--tokenizer", "byte",
                     "--valid-fraction", "0.1"])
    assert decoded_documents(tmp_path / "c_train", ByteTokenizer()) == [f"document {i}" for i in range(9)]
    assert decoded_documents(tmp_path / "c_valid", ByteTokenizer()) == ["document 9"]


def test_cli_trains_the_tokenizer_on_the_training_documents_only(tmp_path, preprocess_main):
    """The held-out documents stay unseen: the tokenizer is the one trained on the training split alone
    (the validation text, trained on, would add merges of its own)."""
    texts = ["alpha beta gamma " * 5, "delta epsilon zeta " * 5, "theta iota kappa " * 5, "qxqxqx zwzwzw " * 20]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    preprocess_main(["--input", str(corpus), "--output-prefix", str(tmp_path / "c"), "--train-tokenizer-vocab", "300",
                     "--tokenizer-output", str(tmp_path / "cli.json"), "--valid-fraction", "0.25"])
    train_bpe_tokenizer(texts[:3], 300, tmp_path / "direct.json")
    assert (json.loads((tmp_path / "cli.json").read_text())["model"]
            == json.loads((tmp_path / "direct.json").read_text())["model"])
    assert "qx" not in json.loads((tmp_path / "cli.json").read_text())["model"]["vocab"]


@pytest.mark.parametrize(("extra_args", "message"), [
    (["--train-tokenizer-vocab", "300"], "--train-tokenizer-vocab needs --tokenizer-output"),
    (["--tokenizer", "byte", "--tokenizer-output", "t.json"], "--tokenizer-output is only used with"),
    ([], "one of the arguments --tokenizer --train-tokenizer-vocab is required"),
    (["--tokenizer", "byte", "--workers", "0"], "--workers must be at least 1, got 0"),
    (["--tokenizer", "byte", "--valid-fraction", "1.0"], "--valid-fraction must be in [0, 1), got 1.0"),
    (["--tokenizer", "byte", "--valid-fraction", "-0.1"], "--valid-fraction must be in [0, 1), got -0.1"),
    (["--train-tokenizer-vocab", "256", "--tokenizer-output", "t.json"],
     "--train-tokenizer-vocab 256 is too small: byte-level BPE needs at least 257"),
    # an option of the other input type: ignored before, the documents split otherwise than asked
    (["--tokenizer", "byte", "--split-on-blank-lines"], "--split-on-blank-lines is for a .txt input, not"),
    (["--tokenizer", "byte", "--input", "plays.txt", "--json-key", "body"], "--json-key is for a JSON-lines or Parquet input, not plays.txt"),
    (["--tokenizer", "byte", "--input", "a.jsonl", "b.txt", "--json-key", "body"],
     "--json-key is for a JSON-lines or Parquet input, not b.txt"),
    (["--tokenizer", "byte", "--input", "a.jsonl", "b.jsonl", "a.jsonl"], "--input names a.jsonl twice"),
    (["--tokenizer", "byte", "--input", "a.jsonl", "sub/../a.jsonl"], "--input names sub/../a.jsonl twice (a.jsonl and"
                                                                       " sub/../a.jsonl)"),
    (["--tokenizer", "byte", "--input", "a.jsonl", "--input", "a.jsonl"], "--input names a.jsonl twice"),
    (["--train-tokenizer-vocab", "300", "--input", "a.jsonl", "b.jsonl", "--tokenizer-output", "b.jsonl"],
     "--tokenizer-output b.jsonl is an --input (b.jsonl)"),
])
def test_cli_contradictory_or_missing_tokenizer_options_are_refused(tmp_path, preprocess_main, extra_args, message,
                                                                    capsys):
    """--train-tokenizer-vocab without --tokenizer-output, --tokenizer-output with a given tokenizer,
    no tokenizer at all, no worker, a held-out fraction outside [0, 1), a BPE smaller than the bytes or an
    option of the other input type: argparse's usage error (exit 2), before anything is read (the input here does not exist) or trained."""
    with pytest.raises(SystemExit) as exit_:
        preprocess_main(["--input", str(tmp_path / "absent.jsonl"), "--output-prefix", str(tmp_path / "c"), *extra_args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "extra_args", "error"),
    [
        ("\n \n", [], r"corpus\.jsonl contains no \(non-blank\) documents"),
        ('{"text": "a"}\n{"text": "b"}\n', ["--valid-fraction", "0.6"], "leaving no training document"),
        ('{"text": "a"}\n{"body": "b"}\n', [], r"corpus\.jsonl:2: missing key 'text'"),
        # valid JSON and UTF-8, but no tokenizer encodes it: refused in the first pass, not while writing
        ('{"text": "a"}\n{"text": "b \\ud800"}\n', ["--valid-fraction", "0.5"],
         r"corpus\.jsonl:2: 'text' holds a lone surrogate \(U\+D800 at character 2\)"),
    ],
)
def test_cli_bad_input_errors_and_writes_nothing(tmp_path, preprocess_main, content, extra_args, error):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(content)
    argv = ["--input", str(corpus), "--output-prefix", str(tmp_path / "c"), "--tokenizer", "byte"]
    with pytest.raises(ValueError, match=error):
        preprocess_main(argv + extra_args)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.jsonl"]


def fill_the_disk_on_the_validation_split(preprocess_main, monkeypatch) -> None:
    """The tool's next run fails with a full disk while it writes the validation split."""
    globals_ = preprocess_main.__globals__
    real = globals_["write_indexed"]

    def disk_full_on_the_second_split(prefix, *args, **kwargs):
        if "_valid" in str(prefix):
            raise OSError(28, "No space left on device")
        return real(prefix, *args, **kwargs)

    monkeypatch.setitem(globals_, "write_indexed", disk_full_on_the_second_split)


def test_cli_refuses_to_replace_outputs_without_force(tmp_path, preprocess_main, capsys):
    """A dataset a run trains on, re-tokenised under it, was replaced silently (the resume then read other ids)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "first"}\n{"text": "second"}\n')
    argv = ["--input", str(corpus), "--output-prefix", str(tmp_path / "c"), "--tokenizer", "byte"]
    preprocess_main(argv)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    corpus.write_text('{"text": "other"}\n{"text": "more"}\n')
    with pytest.raises(SystemExit):
        preprocess_main(argv)
    assert (f"{tmp_path / 'c.bin'}, {tmp_path / 'c.idx'} already exist: pass --force to replace"
            in capsys.readouterr().err)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name != "corpus.jsonl"} == {
        name: data for name, data in before.items() if name != "corpus.jsonl"}
    preprocess_main(argv + ["--valid-fraction", "0.5"])  # other outputs (c_train, c_valid): nothing in their way
    preprocess_main(argv + ["--force"])
    assert decoded_documents(tmp_path / "c", ByteTokenizer()) == ["other", "more"]
    # a tokenizer file in the way, with a new output prefix: kept too (another run's tokenizer.json)
    (tmp_path / "tok.json").write_text("mine")
    trained = ["--input", str(corpus), "--output-prefix", str(tmp_path / "new"), "--train-tokenizer-vocab", "300",
               "--tokenizer-output", str(tmp_path / "tok.json")]
    with pytest.raises(SystemExit):
        preprocess_main(trained)
    assert f"{tmp_path / 'tok.json'} already exists: pass --force" in capsys.readouterr().err
    assert (tmp_path / "tok.json").read_text() == "mine" and not (tmp_path / "new.bin").exists()


def test_cli_failure_in_the_second_split_replaces_neither(tmp_path, preprocess_main, monkeypatch):
    """The splits are published together: a failure while writing the validation split (a full disk
    here) keeps the previous run's train and validation files, not a new train beside an old valid."""
    corpus = tmp_path / "corpus.jsonl"
    argv = ["--input", str(corpus), "--output-prefix", str(tmp_path / "c"), "--tokenizer", "byte",
            "--valid-fraction", "0.5"]
    corpus.write_text('{"text": "old train"}\n{"text": "old valid"}\n')
    preprocess_main(argv)
    fill_the_disk_on_the_validation_split(preprocess_main, monkeypatch)
    corpus.write_text('{"text": "new train"}\n{"text": "new valid"}\n')
    with pytest.raises(OSError, match="No space left"):
        preprocess_main(argv + ["--force"])
    assert decoded_documents(tmp_path / "c_train", ByteTokenizer()) == ["old train"]
    assert decoded_documents(tmp_path / "c_valid", ByteTokenizer()) == ["old valid"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "c_train.bin", "c_train.idx", "c_valid.bin", "c_valid.idx", "corpus.jsonl"]


def test_cli_hands_workers_and_document_counts_on_and_reports_progress(tmp_path, preprocess_main, monkeypatch,
                                                                        capsys):
    """--workers reaches the encoder, each split's progress line counts towards its own document total,
    and a missing --input is one error line (the real command line), not a traceback."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(9)))
    globals_ = preprocess_main.__globals__
    calls = []
    real = globals_["write_indexed"]
    monkeypatch.setitem(globals_, "write_indexed", lambda *args, **kwargs: calls.append((args, kwargs)) or real(*args, **kwargs))
    monkeypatch.setitem(globals_, "PROGRESS_EVERY_S", 0.0)  # a progress line for every document
    preprocess_main(["--input", str(corpus), "--output-prefix", str(tmp_path / "c"), "--tokenizer", "byte",
                     "--workers", "2", "--valid-fraction", "0.2"])
    assert [args[3] for args, _ in calls] == [2, 2]
    assert [kwargs["expected_documents"] for _, kwargs in calls] == [7, 2]
    out = capsys.readouterr().out
    assert "7/7 documents (100.0%)" in out and "2/2 documents (100.0%) | 100.0% of the input's text, ETA 0:00:00" in out
    assert decoded_documents(tmp_path / "c_valid", ByteTokenizer()) == ["document number 7", "document number 8"]

    done = run_preprocess("--input", str(tmp_path / "absent.txt"), "--output-prefix", str(tmp_path / "missing"),
                          "--tokenizer", "byte")
    assert done.returncode == 1 and done.stderr.startswith("preprocess_data: error: ") and "absent.txt" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.glob("missing*"))


def train_tokenizer_argv(tmp_path) -> list[str]:
    return ["--input", str(tmp_path / "corpus.jsonl"), "--output-prefix", str(tmp_path / "c"),
            "--valid-fraction", "0.5", "--train-tokenizer-vocab", "300", "--tokenizer-output", str(tmp_path / "tok.json")]


def file_contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_cli_removes_what_killed_runs_on_this_host_staged(tmp_path, preprocess_main, capsys):
    """A SIGKILLed run (the OOM killer) leaves its staged files: the next run removes those whose process is
    gone. A live process's, or another host's on a shared file system, may belong to a run still going."""
    (tmp_path / "corpus.jsonl").write_text('{"text": "a train"}\n{"text": "a valid"}\n')
    exited = subprocess.Popen([sys.executable, "-c", ""])
    exited.wait()
    host = socket.gethostname()
    abandoned = [f"c_train.partial-{host}-{exited.pid}.bin", f"c_valid.partial-{host}-{exited.pid}.idx.77-abc.tmp",
                 f"tok.json.partial-{host}-{exited.pid}", f"c.partial-{host}-{exited.pid}.bin"]
    running = [f"c_train.partial-{host}-{os.getppid()}.bin", f"c_train.partial-elsewhere-{exited.pid}.bin",
               f"c_train.partial-{host}-4999999-{exited.pid}.bin",  # host "<this host>-4999999"
               f"c_trained.partial-{host}-{exited.pid}.bin"]
    for name in abandoned + running:
        (tmp_path / name).write_text("staged")
    preprocess_main(train_tokenizer_argv(tmp_path))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        running + ["corpus.jsonl", "tok.json", "c_train.bin", "c_train.idx", "c_valid.bin", "c_valid.idx"])
    said = capsys.readouterr().out.splitlines()[0]
    assert said.startswith("removed 4 staged files of killed runs: ") and all(name in said for name in abandoned)


def test_cli_a_failure_after_training_keeps_the_previous_tokenizer(tmp_path, preprocess_main, monkeypatch):
    """The trained tokenizer is published with the datasets, not when trained: a failure while encoding
    leaves the previous tokenizer.json beside the token ids it made, and no staged copy."""
    (tmp_path / "corpus.jsonl").write_text('{"text": "old train old"}\n{"text": "old valid"}\n')
    preprocess_main(train_tokenizer_argv(tmp_path))
    before = file_contents(tmp_path)
    fill_the_disk_on_the_validation_split(preprocess_main, monkeypatch)
    (tmp_path / "corpus.jsonl").write_text('{"text": "a new train text"}\n{"text": "a new valid text"}\n')
    with pytest.raises(OSError, match="No space left"):
        preprocess_main(train_tokenizer_argv(tmp_path) + ["--force"])
    assert file_contents(tmp_path) == {**before, "corpus.jsonl": (tmp_path / "corpus.jsonl").read_bytes()}


@pytest.mark.parametrize("taken", ["corpus.jsonl", "c_train.bin", "c_valid.idx"])
def test_cli_refuses_a_tokenizer_output_that_is_the_input_or_a_dataset(tmp_path, preprocess_main, taken, capsys):
    (tmp_path / "corpus.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    argv = train_tokenizer_argv(tmp_path)
    argv[argv.index("--tokenizer-output") + 1] = str(tmp_path / taken)
    with pytest.raises(SystemExit) as exit_:
        preprocess_main(argv)
    assert exit_.value.code == 2 and f"--tokenizer-output {tmp_path}/{taken} is " in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_cli_checks_where_it_writes_before_reading(tmp_path, preprocess_main, capsys):
    """Unwritable or misnamed outputs fail first, named as given (not as a staging file), even before a
    missing input is noticed: not after reading and training for hours."""
    argv = train_tokenizer_argv(tmp_path)  # its --input does not exist
    tokenizer_output = argv.index("--tokenizer-output") + 1
    argv[tokenizer_output] = "/proc/t.json"
    with pytest.raises(ValueError, match=r"^--tokenizer-output /proc/t\.json: cannot write in /proc \("):
        preprocess_main(argv)
    argv[tokenizer_output] = str(tmp_path)
    with pytest.raises(SystemExit):
        preprocess_main(argv)
    assert f"--tokenizer-output {tmp_path} is a directory" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=rf"^--output-prefix {tmp_path}/afile/x: {tmp_path}/afile is a file"):
        preprocess_main(["--input", str(tmp_path / "absent.txt"), "--output-prefix", str(tmp_path / "afile" / "x"),
                         "--tokenizer", "byte"])
    with pytest.raises(SystemExit):  # would write the hidden files out/.bin and out/.idx
        preprocess_main(["--input", str(tmp_path / "absent.txt"), "--output-prefix", f"{tmp_path}/out/",
                         "--tokenizer", "byte"])
    assert "has no file name" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]


def test_cli_reports_each_phase_under_the_names_given(tmp_path, preprocess_main, monkeypatch, capsys):
    """Reading, training and encoding each say when they start and end, progress lines name the prefix
    the files are published as (never a staging name), and skipped blank records are counted."""
    records = ["first document", " ", "second document", "", "third document", "fourth document"]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in records))
    monkeypatch.setitem(preprocess_main.__globals__, "PROGRESS_EVERY_S", 0.0)  # a progress line per document
    preprocess_main(train_tokenizer_argv(tmp_path))
    out = capsys.readouterr().out
    assert "partial" not in out
    lines = out.splitlines()
    assert lines[0] == f"reading {tmp_path}/corpus.jsonl ..."
    assert lines[-1] == f"wrote {tmp_path}/c_train.bin/.idx, {tmp_path}/c_valid.bin/.idx, {tmp_path}/tok.json"
    assert any(line.startswith(f"read {tmp_path}/corpus.jsonl: 4 documents,")
               and line.endswith("; skipped 2 blank documents; 2 held out for validation") for line in lines)
    for expected in ("training a byte-level BPE tokenizer of 300 tokens on the 2 training documents ...",
                     "training the tokenizer: 2/2 documents (100.0%)", "trained HFTokenizer(",
                     f"encoding {tmp_path}/c_train (2 documents) ...",
                     f"{tmp_path}/c_valid: 1 documents", f"encoded {tmp_path}/c_valid: 2 documents"):
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    vocab_size = HFTokenizer(tmp_path / "tok.json").vocab_size  # two short documents hold few pairs to merge
    assert vocab_size < 300 and f"note: the training documents gave only {vocab_size} of the 300 tokens asked for" in lines


# Runs the tool with a validation split that takes 0.1 s a document to write, so that a signal sent once the
# training split is staged arrives while the tool works, however fast the machine.
SLOW_VALID_SPLIT = """
import runpy, sys, time
from megatron_unipool.data.indexed_dataset import IndexedDatasetWriter
add_document = IndexedDatasetWriter.add_document
def add_slowly(self, token_ids):
    if "_valid" in self.prefix:
        time.sleep(0.1)
    add_document(self, token_ids)
IndexedDatasetWriter.add_document = add_slowly
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(("stop", "workers"), [(signal.SIGTERM, "2"), (signal.SIGINT, "1")])
def test_cli_interrupted_by_a_signal_removes_what_it_staged(tmp_path, preprocess_main, stop, workers):
    """SIGTERM (`timeout`, a scheduler) stops the tool as Ctrl-C does: the staged datasets and tokenizer
    are removed, the previous files are left byte for byte, and it says so in one line (exit 128 + the
    signal's number), with no traceback from it or its encoding workers."""
    (tmp_path / "corpus.jsonl").write_text('{"text": "old train"}\n{"text": "old valid"}\n')
    preprocess_main(train_tokenizer_argv(tmp_path))
    before = file_contents(tmp_path)
    new_documents = [json.dumps({"text": f"new document {i}"}) + "\n" for i in range(400)]
    (tmp_path / "corpus.jsonl").write_text("".join(new_documents))
    tool = subprocess.Popen(
        [sys.executable, "-c", SLOW_VALID_SPLIT, str(PREPROCESS_SCRIPT), *train_tokenizer_argv(tmp_path),
         "--workers", workers, "--force"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in tool.stdout:
            if line.startswith(f"encoded {tmp_path}/c_train:"):
                tool.send_signal(stop)
                break
        out, err = tool.communicate(timeout=60)
    finally:
        tool.kill()
    interrupted = "preprocess_data: interrupted; the previous files are unchanged\n"
    assert (tool.returncode, err) == (128 + stop, interrupted), out
    assert file_contents(tmp_path) == {**before, "corpus.jsonl": (tmp_path / "corpus.jsonl").read_bytes()}


def group_ended(pgid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# Runs the tool with a byte tokenizer busy for 8 ms a document, so that it encodes for seconds on any machine.
SLOW_BYTE_TOKENIZER = """
import runpy, sys, time
from megatron_unipool.data.tokenizers import ByteTokenizer
encode_as_array = ByteTokenizer.encode_as_array
def encode_slowly(self, text):
    busy_until = time.perf_counter() + 0.008
    while time.perf_counter() < busy_until:
        pass
    return encode_as_array(self, text)
ByteTokenizer.encode_as_array = encode_slowly
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cli_a_sigterm_to_its_process_group_stops_the_tool_and_its_workers(tmp_path, preprocess_main):
    """`timeout`, Slurm and Kubernetes signal the whole process group, encoding workers included. Under
    multiprocessing.Pool a worker killed while it held the result queue's lock left Pool.terminate() in the
    parent blocked for ever, with the staged files left behind: here 1 run in 3 hung. (That a worker killed
    mid-result never holds up the parent is tested deterministically in test_encoding.)"""
    argv = ["--input", str(tmp_path / "corpus.jsonl"), "--output-prefix", str(tmp_path / "c"), "--tokenizer", "byte"]
    (tmp_path / "corpus.jsonl").write_text('{"text": "old"}\n')
    preprocess_main(argv)
    # 400 documents of 100 KB, so that the workers spend much of their time sending results
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 8000}) + "\n"
                                                   for i in range(400)))
    before = file_contents(tmp_path)
    for delay_s in (0.2, 0.5, 1.0):
        tool = subprocess.Popen([sys.executable, "-c", SLOW_BYTE_TOKENIZER, str(PREPROCESS_SCRIPT), *argv,
                                 "--workers", "2", "--force"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            for line in tool.stdout:
                if line.startswith("encoding "):
                    time.sleep(delay_s)
                    os.killpg(tool.pid, signal.SIGTERM)
                    break
            out, err = tool.communicate(timeout=30)
            assert group_ended(tool.pid, within_s=10), "an encoding worker outlived the tool"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(tool.pid, signal.SIGKILL)
        assert (tool.returncode, err) == (128 + signal.SIGTERM,
                                          "preprocess_data: interrupted; the previous files are unchanged\n"), out
        assert file_contents(tmp_path) == before


# Runs the tool slowly (SLOW_VALID_SPLIT) with a SIGTERM sent to itself as the validation split's encoding pool
# forks its first worker: from an at-fork hook in the parent, inside Process.start().
SIGNAL_WHILE_FORKING = """
import os, signal, time
from megatron_unipool.data.indexed_dataset import IndexedDatasetWriter
writer_init, state = IndexedDatasetWriter.__init__, {"valid": False}
def noting_the_split(self, prefix, *args, **kwargs):
    state["valid"] = "_valid" in str(prefix)
    writer_init(self, prefix, *args, **kwargs)
IndexedDatasetWriter.__init__ = noting_the_split
def signal_once():
    if state.pop("valid", False):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)  # delivered meanwhile: to a thread that does not block it, the handler then runs here
os.register_at_fork(after_in_parent=signal_once)
""" + SLOW_VALID_SPLIT


def test_cli_a_signal_while_the_encoding_workers_start_stops_the_tool_at_once(tmp_path, preprocess_main):
    """Interrupts are held while the pool forks, but blocking them in the main thread did not hold them: the
    kernel gave a SIGTERM to a thread that did not block it (the tokenizer's), and Python raised the
    KeyboardInterrupt in the main thread wherever it was. In an at-fork hook it was printed as "Exception
    ignored" and lost, so the tool encoded its whole validation split first (20 s here); inside Pool() it
    escaped before the pool was registered for clean-up, leaving workers that held the output pipes."""
    (tmp_path / "corpus.jsonl").write_text('{"text": "old train"}\n{"text": "old valid"}\n')
    preprocess_main(train_tokenizer_argv(tmp_path))
    before = file_contents(tmp_path)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f"new document {i}"}) + "\n" for i in range(400)))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_FORKING, str(PREPROCESS_SCRIPT),
                           *train_tokenizer_argv(tmp_path), "--workers", "2", "--force"],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (128 + signal.SIGTERM,
                                              "preprocess_data: interrupted; the previous files are unchanged\n")
    assert time.monotonic() - started < 15  # not after the 200 validation documents' 0.1 s each
    assert file_contents(tmp_path) == {**before, "corpus.jsonl": (tmp_path / "corpus.jsonl").read_bytes()}


# Runs the tool with a SIGTERM sent to itself as it starts publishing, once the old files are gone.
SIGNAL_WHILE_PUBLISHING = """
import os, runpy, signal, sys
import megatron_unipool.data as data
publish_indexed = data.publish_indexed
def signalled(staged):
    os.kill(os.getpid(), signal.SIGTERM)
    publish_indexed(staged)
data.publish_indexed = signalled
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cli_a_signal_while_publishing_lets_the_new_files_stand_whole(tmp_path):
    """Publishing removes the previous datasets before it renames the new ones in: a signal then would
    have left neither (and a message saying the previous files were unchanged)."""
    (tmp_path / "corpus.jsonl").write_text('{"text": "new train"}\n{"text": "new valid"}\n')
    done = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_PUBLISHING, str(PREPROCESS_SCRIPT), "--input",
                           str(tmp_path / "corpus.jsonl"), "--output-prefix", str(tmp_path / "c"), "--tokenizer", "byte",
                           "--valid-fraction", "0.5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ("preprocess_data: the interrupt came while the files were"
                                                    " published: they were published whole\n"), done.stderr
    assert decoded_documents(tmp_path / "c_train", ByteTokenizer()) == ["new train"]
    assert decoded_documents(tmp_path / "c_valid", ByteTokenizer()) == ["new valid"]


def test_cli_trains_the_smallest_byte_level_bpe(tmp_path, preprocess_main):
    """257 (the 256 bytes and EOD, no merge) is what train_bpe_tokenizer accepts: the CLI's early check
    refuses below it, not at it."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "abc abc abc"}) + "\n" + json.dumps({"text": "def def"}) + "\n")
    preprocess_main(["--input", str(corpus), "--output-prefix", str(tmp_path / "c"), "--train-tokenizer-vocab", "257",
                     "--tokenizer-output", str(tmp_path / "t.json")])
    assert (tmp_path / "t.json").is_file() and (tmp_path / "c.bin").is_file()


def test_hf_tokenizer_ignores_truncation_and_padding_saved_in_the_file(tmp_path):
    import tokenizers as hf

    from megatron_unipool.data import build_tokenizer, train_bpe_tokenizer

    text = "hello world foo bar " * 50
    plain = train_bpe_tokenizer([text] * 10, 300, tmp_path / "tok.json")
    raw = hf.Tokenizer.from_file(str(tmp_path / "tok.json"))
    raw.enable_truncation(max_length=8)
    raw.enable_padding(length=512, pad_id=plain.eod_id, pad_token="<|endoftext|>")
    raw.save(str(tmp_path / "tok_trunc_pad.json"))
    tokenizer = build_tokenizer(str(tmp_path / "tok_trunc_pad.json"))
    assert tokenizer.encode(text) == plain.encode(text)
    assert tokenizer.encode("hi") == plain.encode("hi")
    assert pickle.loads(pickle.dumps(tokenizer)).encode(text) == plain.encode(text)
