"""Tokenise-once, memory-mapped token storage (Megatron-style ``.bin`` + ``.idx`` pair).

Tokenising a corpus is slow and training reads it many times, so documents are
tokenised once and stored as one flat token stream that every rank memory-maps
for free random access.

``<prefix>.bin`` holds the raw token ids of all documents back to back, each
document followed by the end-of-document (EOD) token, as little-endian
``uint16`` when ``vocab_size <= 65536`` and ``uint32`` otherwise.

``<prefix>.idx`` describes it, all fields little-endian::

    offset  size  field
    0       8     magic          b"MUPIDX\\x00\\x00"
    8       4     version        uint32, currently 2
    12      4     dtype code     uint32, 1 = uint16 tokens, 2 = uint32 tokens
    16      8     vocab_size     uint64
    24      8     eod_id         uint64
    32      8     num_docs       uint64
    40      8     total_tokens   uint64 (EOD tokens included)
    48      16    tokenizer      the writing tokenizer's ``name``, ASCII, NUL-padded
    64      8*(num_docs+1)       int64 document start offsets into .bin, in
                                 tokens; the last one equals total_tokens

Version 1 files (no tokenizer field: the offsets start at byte 48) are still read; their
``tokenizer`` is ``None``. Two tokenizers with the same vocabulary size and EOD id (byte-level BPEs
trained to one size) write the same header otherwise, and their ids mean different text.

Document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``, its last token is EOD.
"""

from __future__ import annotations

import array
import hashlib
import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_unipool.data.errors import DataError

MAGIC = b"MUPIDX\x00\x00"
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"  # Megatron-LM's MMapIndexedDataset, a format of its own
VERSION = 2
_TOKENIZER_FIELD = 16  # bytes
_HEADERS = {1: struct.Struct("<8sIIQQQQ"), 2: struct.Struct(f"<8sIIQQQQ{_TOKENIZER_FIELD}s")}
_HEADER = _HEADERS[VERSION]
_OFFSET_DTYPE = np.dtype("<i8")
_DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_UINT16_VOCAB_LIMIT = 2**16
_WRITE_SLICE = 1 << 22  # tokens converted and written at a time


def _token_dtype(vocab_size: int) -> np.dtype:
    """Smallest storage dtype that holds every id of a ``vocab_size`` vocabulary."""
    return _DTYPE_CODES[1] if vocab_size <= _UINT16_VOCAB_LIMIT else _DTYPE_CODES[2]


def _paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = os.fspath(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def _temporary_sibling(path: Path) -> Path:
    """A fresh, uniquely named file next to ``path``, so concurrent writers never collide.

    Not ``tempfile.mkstemp``: its 0600 mode would survive the rename and hide a
    shared cache from other users; ``open(..., "x")`` honours the umask.
    """
    temporary = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    open(temporary, "xb").close()
    return temporary


def _publish(pairs: Sequence[tuple[tuple[Path, Path], str | os.PathLike]]) -> None:
    """Rename finished ``(.bin, .idx)`` files onto their target prefixes.

    Every stale target index is dropped first: a crash between the renames then
    leaves a missing ``.idx``, which fails loudly, never a pair (or two splits)
    from different runs.
    """
    moves = [(files, _paths(prefix)) for files, prefix in pairs]
    for _, (_, idx_path) in moves:
        idx_path.unlink(missing_ok=True)
    for (bin_source, idx_source), (bin_path, idx_path) in moves:
        os.replace(bin_source, bin_path)
        os.replace(idx_source, idx_path)


def publish_indexed(moves: Sequence[tuple[str | os.PathLike, str | os.PathLike]]) -> None:
    """Moves finished datasets (source prefix, target prefix) into place together, e.g. a train and a
    validation split written under staging names, so a failure in either leaves neither replaced."""
    _publish([(_paths(source), target) for source, target in moves])


def remove_indexed(prefix: str | os.PathLike) -> None:
    """Deletes ``<prefix>.bin``/``.idx`` where they exist."""
    for path in _paths(prefix):
        path.unlink(missing_ok=True)


class IndexedDatasetWriter:
    """Streams documents into ``<prefix>.bin``/``.idx``, published atomically.

    Both files are written under temporary names and renamed only when the
    ``with`` block exits cleanly, so an exception or a crash never leaves a
    half-written pair that a later run would mistake for a finished one.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int, eod_id: int, tokenizer: str):
        if not 0 < vocab_size <= 2**32:
            raise DataError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
        if not 0 <= eod_id < vocab_size:
            raise DataError(f"eod_id {eod_id} is outside the vocabulary [0, {vocab_size})")
        if not (tokenizer.isascii() and 0 < len(tokenizer) <= _TOKENIZER_FIELD and "\0" not in tokenizer):
            raise DataError(f"tokenizer name {tokenizer!r} must be 1 to {_TOKENIZER_FIELD} ASCII characters")
        self.prefix = os.fspath(prefix)
        self.bin_path, self.idx_path = _paths(prefix)
        self.vocab_size = vocab_size
        self.eod_id = eod_id
        self.tokenizer = tokenizer
        self.dtype = _token_dtype(vocab_size)
        self._eod = np.array([eod_id], dtype=self.dtype)
        self._offsets = array.array("q", [0])  # 8 bytes a document (a list of ints holds ~40)
        self._bin_tmp: Path | None = None  # the temporaries exist only inside the `with` block
        self._idx_tmp: Path | None = None
        self._bin_file = None

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def __enter__(self) -> IndexedDatasetWriter:
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = _temporary_sibling(self.bin_path)
        self._idx_tmp = _temporary_sibling(self.idx_path)
        self._bin_file = open(self._bin_tmp, "wb")
        return self

    def add_document(self, token_ids: Sequence[int] | np.ndarray) -> None:
        """Appends one document; the EOD token is added here, not by the caller."""
        if self._bin_file is None:
            raise RuntimeError("IndexedDatasetWriter.add_document must be called inside its `with` block")
        doc_index = self.num_documents
        ids = np.asarray(token_ids)
        if ids.ndim != 1:
            raise DataError(
                f"document {doc_index}: expected a 1-D sequence of token ids, got shape {ids.shape}"
            )
        if ids.size and ids.dtype.kind not in "iu":
            raise DataError(f"document {doc_index}: token ids must be integers, got dtype {ids.dtype}")
        # min and max, not a mask: a 200 MB document's masks alone would take 600 MB
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            first_bad = next(int(i) for i in ids if not 0 <= i < self.vocab_size)
            raise DataError(
                f"document {doc_index}: token id {first_bad} is outside the vocabulary [0, {self.vocab_size})"
            )
        # file.write, not ndarray.tofile: tofile hands the file to C anew on each call, ~10x slower for small
        # documents; a slice at a time, so that a long document's conversion to the storage dtype stays small
        for start in range(0, ids.size, _WRITE_SLICE):
            self._bin_file.write(np.ascontiguousarray(ids[start:start + _WRITE_SLICE], dtype=self.dtype))
        self._bin_file.write(self._eod)
        self._offsets.append(self.num_tokens + ids.size + 1)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bin_file.close()
        self._bin_file = None
        try:
            if exc_type is not None:
                return
            if self.num_documents == 0:
                raise DataError(
                    f"no documents were added to {self.prefix}; refusing to write an empty dataset"
                )
            self._write_index(self._idx_tmp)
            _publish([((self._bin_tmp, self._idx_tmp), self.prefix)])
        finally:
            # No-ops after a successful publish: the temporaries were renamed.
            self._bin_tmp.unlink(missing_ok=True)
            self._idx_tmp.unlink(missing_ok=True)

    def _write_index(self, path: Path) -> None:
        dtype_code = next(code for code, dtype in _DTYPE_CODES.items() if dtype == self.dtype)
        header = _HEADER.pack(
            MAGIC, VERSION, dtype_code, self.vocab_size, self.eod_id, self.num_documents, self.num_tokens,
            self.tokenizer.encode("ascii"),
        )
        with open(path, "wb") as f:
            f.write(header)
            np.frombuffer(self._offsets, dtype=np.int64).astype(_OFFSET_DTYPE, copy=False).tofile(f)


class IndexedDataset:
    """Read-only view of a ``.bin``/``.idx`` pair; token access never copies."""

    def __init__(self, prefix: str | os.PathLike):
        self.bin_path, self.idx_path = _paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                hint = "; give the prefix without .bin/.idx" if os.fspath(prefix).endswith((".bin", ".idx")) else ""
                raise FileNotFoundError(f"indexed dataset file missing: {path}{hint}")
        self._read_index()
        self._check_bin_size()
        self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def _read_index(self) -> None:
        raw = self.idx_path.read_bytes()
        if len(raw) < _HEADERS[1].size:
            raise DataError(
                f"{self.idx_path}: {len(raw)} bytes is too short for the {_HEADERS[1].size}-byte header"
            )
        magic, version = _HEADERS[1].unpack_from(raw)[:2]
        if raw.startswith(MEGATRON_MAGIC):
            raise DataError(
                f"{self.idx_path} is a Megatron-LM index, which records neither the vocabulary size nor the"
                " end-of-document id this reader checks: tokenise the source text with tools/preprocess_data.py"
            )
        if magic != MAGIC:
            raise DataError(
                f"{self.idx_path}: bad magic {magic!r}, expected {MAGIC!r}; not an indexed dataset index"
            )
        if version not in _HEADERS:
            raise DataError(
                f"{self.idx_path}: unsupported format version {version}, this reader handles {sorted(_HEADERS)}"
            )
        header = _HEADERS[version]
        if len(raw) < header.size:
            raise DataError(
                f"{self.idx_path}: {len(raw)} bytes is too short for the {header.size}-byte version {version} header"
            )
        _, _, dtype_code, vocab_size, eod_id, num_docs, total_tokens, *tokenizer = header.unpack_from(raw)
        if dtype_code not in _DTYPE_CODES:
            raise DataError(
                f"{self.idx_path}: unknown dtype code {dtype_code}, expected one of {sorted(_DTYPE_CODES)}"
            )
        if not 0 <= eod_id < vocab_size:
            raise DataError(f"{self.idx_path}: eod_id {eod_id} is outside the vocabulary [0, {vocab_size})")
        if _DTYPE_CODES[dtype_code] != _token_dtype(vocab_size):
            raise DataError(
                f"{self.idx_path}: tokens stored as {_DTYPE_CODES[dtype_code].name} for a vocabulary of "
                f"{vocab_size}, which needs {_token_dtype(vocab_size).name}; the index is damaged"
            )
        if num_docs == 0:
            raise DataError(f"{self.idx_path}: holds no documents")
        expected_size = header.size + (num_docs + 1) * _OFFSET_DTYPE.itemsize
        if len(raw) != expected_size:
            raise DataError(
                f"{self.idx_path}: size {len(raw)} bytes does not match the {expected_size} bytes "
                f"implied by num_docs={num_docs} (truncated or mismatched index)"
            )
        offsets = np.frombuffer(raw, dtype=_OFFSET_DTYPE, offset=header.size)
        if offsets[0] != 0 or offsets[-1] != total_tokens:
            raise DataError(
                f"{self.idx_path}: document offsets span [{offsets[0]}, {offsets[-1]}], "
                f"expected [0, total_tokens={total_tokens}]"
            )
        not_increasing = np.flatnonzero(np.diff(offsets) <= 0)
        if not_increasing.size:
            raise DataError(
                f"{self.idx_path}: document offsets are not increasing at document {not_increasing[0]} "
                "(every document holds at least its EOD token)"
            )
        self.dtype = _DTYPE_CODES[dtype_code]
        self.vocab_size = vocab_size
        self.eod_id = eod_id
        # the writing tokenizer's name (version 2), None for a version 1 file
        self.tokenizer = tokenizer[0].rstrip(b"\0").decode("ascii", "replace") if tokenizer else None
        self._offsets = offsets
        self._content_hash: str | None = None

    def _check_bin_size(self) -> None:
        actual = self.bin_path.stat().st_size
        expected = self.num_tokens * self.dtype.itemsize
        if actual != expected:
            kind = "truncated" if actual < expected else "mismatched (larger than its index says)"
            raise DataError(
                f"{self.bin_path}: {kind}: {actual} bytes on disk, but {self.idx_path.name} describes "
                f"{self.num_tokens} tokens x {self.dtype.itemsize} bytes = {expected} bytes"
            )

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def document_lengths(self) -> np.ndarray:
        """Tokens per document, EOD included."""
        return np.diff(self._offsets)

    def content_hash(self) -> str:
        """A hash of the document offsets (read in place) and of 4096 tokens each at the start, middle and end:
        cheap at any size, and files with other document lengths, or other tokens there, differ in it (an edit
        that keeps every length and falls elsewhere does not). Computed once per open file: a run's start reads
        it for the ranks' agreement and for its checkpoints."""
        if self._content_hash is None:
            digest = hashlib.blake2b(self._offsets, digest_size=8)
            for start in (0, self.num_tokens // 2, max(0, self.num_tokens - 4096)):
                digest.update(self.tokens(start, min(self.num_tokens, start + 4096)).tobytes())
            self._content_hash = digest.hexdigest()
        return self._content_hash

    def __len__(self) -> int:
        return self.num_documents

    def document(self, index: int) -> np.ndarray:
        """Tokens of document ``index``, ending with EOD."""
        if not 0 <= index < self.num_documents:
            raise IndexError(
                f"document {index} out of range for {self.num_documents} documents in {self.bin_path}"
            )
        return self._tokens[self._offsets[index] : self._offsets[index + 1]]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Slice ``[start, stop)`` of the flat token stream, across document boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(
                f"token range [{start}, {stop}) out of bounds for {self.num_tokens} tokens in {self.bin_path}"
            )
        return self._tokens[start:stop]
