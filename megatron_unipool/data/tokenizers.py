"""Tokenizers behind one small interface, all usable offline.

Every implementation exposes an end-of-document id because the indexed dataset
separates documents with it, and a ``name`` that is stable for a given
vocabulary because cached token files are keyed by it.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tiktoken
import tokenizers as hf_tokenizers

from megatron_unipool.data.errors import DataError

GPT2_RANKS_ENV = "MEGATRON_UNIPOOL_GPT2_RANKS"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
_GPT2_MERGEABLE_RANKS = 50256  # byte-pair ranks; <|endoftext|> comes after them
_GPT2_EOD_ID = 50256
_HF_EOD_CANDIDATES = (ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>")
_BYTE_ALPHABET_SIZE = 256
MIN_BPE_VOCAB = _BYTE_ALPHABET_SIZE + 1  # a byte-level BPE holds every byte and EOD before any merge


class Tokenizer(abc.ABC):
    """Text <-> token ids, with the end-of-document id the data pipeline appends."""

    name: str
    vocab_size: int
    eod_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; never emits special tokens, even for text that spells one."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of ``encode``."""

    def encode_as_array(self, text: str) -> np.ndarray:
        """``encode`` as an integer array, the form the dataset writer consumes (and range-checks). The
        tokenizers here return unsigned ids, 4 bytes a token at most: a long document's ids as Python ints
        take ~36."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"
        )


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255 and EOD = 256: no vocabulary file, nothing to fit."""

    name = "byte"
    vocab_size = _BYTE_ALPHABET_SIZE + 1
    eod_id = _BYTE_ALPHABET_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_as_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        """EOD decodes to ``<|endoftext|>`` as in the BPE tokenizers; broken UTF-8 to U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DataError(
                f"byte tokenizer ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}"
            )
        segments = np.split(ids, np.flatnonzero(ids == self.eod_id))
        byte_runs = [segments[0]] + [segment[1:] for segment in segments[1:]]  # drop each leading EOD
        return ENDOFTEXT.join(
            run.astype(np.uint8).tobytes().decode("utf-8", errors="replace") for run in byte_runs
        )


class HFTokenizer(Tokenizer):
    """Any Hugging Face ``tokenizer.json``.

    ``name`` is a hash of the file's contents, so two different tokenizer.json
    files never share a token cache and an edited file invalidates it.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        contents = path.read_bytes()
        try:
            self._tokenizer = hf_tokenizers.Tokenizer.from_str(contents.decode("utf-8"))
        except Exception as error:  # the Rust side raises a bare Exception
            raise DataError(f"{path} is not a valid Hugging Face tokenizer.json: {error}") from error
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        eod_token = next((token for token in _HF_EOD_CANDIDATES if token in vocab), None)
        if eod_token is None:
            raise DataError(
                f"{path}: no end-of-document token in the vocabulary; "
                f"expected one of {list(_HF_EOD_CANDIDATES)}"
            )
        # Text that happens to spell a special token is data, not a document break.
        self._tokenizer.encode_special_tokens = True
        # A tokenizer.json saved with truncation or padding would cut every document to its
        # max_length or fill it with pad tokens: a document is encoded whole, as it is.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.path = path
        self.eod_id = vocab[eod_token]
        self.vocab_size = max(vocab.values()) + 1  # ids may have gaps: the token count can be below the top id
        self.name = "hf-" + hashlib.sha256(contents).hexdigest()[:12]

    def __setstate__(self, state: dict) -> None:
        # The Rust tokenizer pickles without `encode_special_tokens`, so a copy sent to a spawned
        # encoding worker would turn text spelling a special token into a document break.
        self.__dict__.update(state)
        self._tokenizer.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_as_array(self, text: str) -> np.ndarray:
        return np.array(self.encode(text), dtype=np.uint32)  # ids of a Rust u32 vocabulary

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE (ids identical to OpenAI's) through tiktoken, from a local ranks file.

    tiktoken's own ``get_encoding("gpt2")`` downloads its files; the same ranks
    ship inside the ``openai-whisper`` package, which is found without being
    imported (importing it pulls in numba).
    """

    name = "gpt2"

    def __init__(self):
        path = _find_gpt2_ranks()
        self._encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=_read_tiktoken_ranks(path, expected_count=_GPT2_MERGEABLE_RANKS),
            special_tokens={ENDOFTEXT: _GPT2_EOD_ID},
        )
        self.vocab_size = self._encoding.n_vocab
        self.eod_id = _GPT2_EOD_ID

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)  # special-token spellings stay plain text

    def encode_as_array(self, text: str) -> np.ndarray:
        # No special token allowed or disallowed: encode_ordinary's ids, straight from tiktoken's buffer.
        return self._encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))


def _find_gpt2_ranks() -> Path:
    """``$MEGATRON_UNIPOOL_GPT2_RANKS``, else openai-whisper's copy."""
    how_to_get_it = (
        "install the file with `pip install --no-deps openai-whisper==20250625` "
        f"(it ships whisper/assets/gpt2.tiktoken) or point {GPT2_RANKS_ENV} at a gpt2.tiktoken file"
    )
    requested = os.environ.get(GPT2_RANKS_ENV)
    if requested:
        if not Path(requested).is_file():
            raise FileNotFoundError(f"GPT-2 ranks file not found: {requested}; {how_to_get_it}")
        return Path(requested)
    spec = importlib.util.find_spec("whisper")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "assets" / "gpt2.tiktoken"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"GPT-2 ranks file gpt2.tiktoken not found; {how_to_get_it}")


def _read_tiktoken_ranks(path: Path, expected_count: int) -> dict[bytes, int]:
    """Parses ``<base64 token> <rank>`` lines (tiktoken's loader would also write a cache copy)."""
    ranks = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                token, rank = fields
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as error:
                raise DataError(
                    f"{path}:{line_number}: expected '<base64 token> <rank>', got {line[:80]!r}"
                ) from error
    if len(ranks) != expected_count:
        raise DataError(f"{path}: holds {len(ranks)} ranks, GPT-2 has {expected_count}")
    return ranks


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_path: str | os.PathLike) -> HFTokenizer:
    """Trains a byte-level BPE (GPT-2 style, EOD ``<|endoftext|>``) and saves it as tokenizer.json.

    Byte-level means every string is encodable and decodes back exactly.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_BPE_VOCAB} (256 bytes + EOD)"
        )
    output_path = Path(output_path)
    if output_path.is_dir():  # found before training, which can take hours, not after
        raise IsADirectoryError(f"cannot save the tokenizer to {output_path}: it is a directory")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars leave only blank lines in a log; callers report progress
    )
    tokenizer.train_from_iterator(texts, trainer)
    try:
        tokenizer.save(str(output_path))
    except Exception as error:  # the Rust side raises a bare Exception, e.g. "Is a directory (os error 21)"
        raise OSError(f"cannot save the tokenizer to {output_path}: {error}") from error
    return HFTokenizer(output_path)


def build_tokenizer(spec: str) -> Tokenizer:
    """``"byte"``, ``"gpt2"`` or a path to a Hugging Face tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "gpt2":
        return GPT2Tokenizer()
    if spec.endswith(".json") or Path(spec).is_file():
        return HFTokenizer(spec)
    raise DataError(
        f"unknown tokenizer {spec!r}; expected 'byte', 'gpt2', or a path to a Hugging Face tokenizer.json"
    )
