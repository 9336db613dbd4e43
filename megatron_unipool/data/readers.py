"""Documents out of the files a corpus comes in: plain text, JSON lines (also gzip- or zstd-compressed, as The Pile
ships) and Parquet (as Hugging Face datasets ship), streamed, each problem named by file and line or row.

Compressed JSON lines need the ``zstandard`` package for ``.zst``, Parquet needs ``pyarrow``: both optional
(``pip install megatron_unipool[data]``), and a file needing one that is not installed says so.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import io
import json
import os
import re
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from megatron_unipool.data.encoding import utf8_length
from megatron_unipool.data.errors import DataError

_BLANK_LINE_RUN = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")  # LF or CRLF line ends
_BYTE_ORDER_MARK = "\ufeff"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str holds no pairs: any surrogate in one is alone
# input formats by the ending of the file name; a JSON-lines file may be compressed
FORMATS = {".txt": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl", ".parquet": "parquet"}


def input_format(path: Path) -> str:
    """"text", "jsonl" or "parquet", by the file name's ending; another ending is a DataError listing them."""
    for ending, kind in FORMATS.items():
        if path.name.endswith(ending):
            return kind
    raise DataError(f"{path}: unsupported input type; expected a file ending in {', '.join(FORMATS)}")


def read_documents(
    path: str | os.PathLike, json_key: str = "text", split_on_blank_lines: bool = False, allow_empty: bool = False
) -> Iterator[str]:
    """Documents of a file in one of the FORMATS, streamed; blank documents are skipped.

    A ``.txt`` file is one document, or one per blank-line-separated block with
    ``split_on_blank_lines``; a ``.jsonl`` file holds one JSON object per line
    with the text under ``json_key``.  Raises at the end if nothing was found, unless
    ``allow_empty`` (one shard of several).
    """
    path = Path(path)
    return _non_blank(_all_documents(path, json_key, split_on_blank_lines), path, allow_empty)


@dataclasses.dataclass(frozen=True)
class ReadStats:
    documents: int
    blank_documents: int  # skipped: read_documents never yields them
    text_bytes: int
    seconds: float

    @classmethod
    def total(cls, parts: Iterable[ReadStats]) -> ReadStats:
        """The stats of several inputs read one after another."""
        parts = list(parts)
        return cls(*(sum(getattr(part, field.name) for part in parts) for field in dataclasses.fields(cls)))

    def __str__(self) -> str:
        read = f"{self.documents} documents, {self.text_bytes / 1e6:.2f} MB of text, in {self.seconds:.1f} s"
        if not self.blank_documents:
            return read
        return f"{read}; skipped {self.blank_documents} blank document{'s' * (self.blank_documents != 1)}"


def count_documents(
    path: str | os.PathLike,
    json_key: str = "text",
    split_on_blank_lines: bool = False,
    report_every_s: float | None = None,
    allow_empty: bool = False,
) -> ReadStats:
    """Reads ``path`` as ``read_documents`` does, checking every line, and counts what it would yield
    and the blank documents it would skip, so that a caller can say how many were dropped.

    ``report_every_s`` prints a progress line at most that often: a large input takes minutes.
    """
    path = Path(path)
    started = last_report = time.perf_counter()
    documents = blank_documents = text_bytes = 0
    for document in _all_documents(path, json_key, split_on_blank_lines):
        if _is_blank(document):
            blank_documents += 1
            continue
        documents += 1
        text_bytes += utf8_length(document)
        now = time.perf_counter()
        if report_every_s is not None and now - last_report >= report_every_s:
            print(f"reading {path}: {ReadStats(documents, blank_documents, text_bytes, now - started)}", flush=True)
            last_report = now
    if documents == 0 and not allow_empty:
        raise _no_documents_error(path)
    return ReadStats(documents, blank_documents, text_bytes, time.perf_counter() - started)


def _all_documents(path: Path, json_key: str, split_on_blank_lines: bool) -> Iterator[str]:
    """The documents of ``path``, blank ones included; a bad path fails here, not when iterated."""
    if path.is_dir():
        raise IsADirectoryError(f"input {path} is a directory; expected a file ending in {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    kind = input_format(path)
    if kind == "text":
        return _txt_documents(path, split_on_blank_lines)
    if kind == "parquet":
        return _parquet_documents(path, json_key)
    return _jsonl_documents(path, json_key)


def _non_blank(documents: Iterable[str], path: Path, allow_empty: bool) -> Iterator[str]:
    found = False
    for document in documents:
        if not _is_blank(document):
            found = True
            yield document
    if not found and not allow_empty:
        raise _no_documents_error(path)


def _is_blank(text: str) -> bool:
    """Empty or whitespace only; not ``text.strip()``, which copies a long document that ends in a space."""
    return not text or text.isspace()


def _no_documents_error(path: Path) -> DataError:
    return DataError(f"{path} contains no (non-blank) documents")


def _txt_documents(path: Path, split_on_blank_lines: bool) -> Iterator[str]:
    text = read_utf8(path)
    if not split_on_blank_lines:
        yield text
        return
    # A blank-line run at the start or end of the file leaves an empty block, which is no document.
    yield from (block for block in _BLANK_LINE_RUN.split(text) if block)


def _optional_module(name: str, path: Path):
    """An optional package a file's format needs, or a DataError saying which to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        package = name.split(".")[0]
        raise DataError(f"{path}: reading it needs the {package} package (pip install {package}, or"
                        " megatron_unipool[data])") from None


class _ZstdStream(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame. A file that ends inside a frame (a cut-short
    download) is an EOFError at its end, as gzip's reader raises, where zstandard's own stream reader stops
    quietly with part of the corpus."""

    def __init__(self, path: Path, zstandard):
        super().__init__()
        self._file = open(path, "rb")
        self._context = zstandard.ZstdDecompressor(max_window_size=2**31)  # files written with zstd --long too
        self._frame = self._context.decompressobj()
        self._in_frame = False
        self._pending, self._offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._pending):
            chunk = self._file.read(1 << 18)  # its decompressed bytes are held at once: a few MiB of text
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame: it was cut short")
                return 0
            self._pending, self._offset = self._decompress(chunk), 0
        size = min(len(buffer), len(self._pending) - self._offset)
        buffer[:size] = self._pending[self._offset: self._offset + size]
        self._offset += size
        return size

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self._in_frame = True
            out.append(self._frame.decompress(chunk))
            chunk = b""
            if self._frame.eof:  # what follows is the next frame
                chunk, self._frame, self._in_frame = self._frame.unused_data, self._context.decompressobj(), False
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_lines(path: Path) -> BinaryIO:
    """``path``'s bytes, decompressed as they stream where its name ends in .gz or .zst."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(_ZstdStream(path, _optional_module("zstandard", path)))
    return open(path, "rb")


def _decompression_errors(path: Path) -> tuple[type[BaseException], ...]:
    """What reading a damaged or truncated compressed file raises (gzip: OSError, EOFError or zlib.error; zstd:
    EOFError or ZstdError)."""
    if path.name.endswith(".gz"):
        return OSError, EOFError, zlib.error
    if path.name.endswith(".zst"):
        return EOFError, _optional_module("zstandard", path).ZstdError
    return ()


def _jsonl_documents(path: Path, json_key: str) -> Iterator[str]:
    damaged = _decompression_errors(path)
    try:
        yield from _jsonl_lines(path, json_key)
    except damaged as error:
        raise DataError(f"{path}: cannot be decompressed ({error})") from error


def _jsonl_lines(path: Path, json_key: str) -> Iterator[str]:
    with _open_lines(path) as f:
        for line_number, raw_line in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{where}: not valid UTF-8 ({error.reason} at byte {error.start})"
                ) from error
            del raw_line  # a long document's line: one copy at a time, here and below
            if line_number == 1:
                line = line.removeprefix(_BYTE_ORDER_MARK)
            if _is_blank(line):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from error
            except RecursionError as error:  # pathological nesting: json's C decoder recurses
                raise DataError(f"{where}: JSON nested too deeply to read") from error
            del line
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if json_key not in record:
                raise DataError(f"{where}: missing key {json_key!r} (keys: {sorted(record)[:10]})")
            text = record[json_key]
            if not isinstance(text, str):
                raise DataError(f"{where}: {json_key!r} holds {type(text).__name__}, expected a string")
            # JSON escapes can spell a lone surrogate ("\\ud800"), which no tokenizer can encode
            if not text.isascii() and (surrogate := _LONE_SURROGATE.search(text)):
                raise DataError(
                    f"{where}: {json_key!r} holds a lone surrogate (U+{ord(surrogate.group()):04X} at "
                    f"character {surrogate.start()}), which is not encodable text"
                )
            del record
            yield text


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    """The strings of a Parquet file's `column`, read 1024 rows at a time; a null row is a blank document."""
    arrow, parquet = _optional_module("pyarrow", path), _optional_module("pyarrow.parquet", path)
    try:
        table = parquet.ParquetFile(path)
    except Exception as error:  # pyarrow's ArrowInvalid: not a Parquet file, or a damaged one
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error
    schema = table.schema_arrow
    if column not in schema.names:
        raise DataError(f"{path}: no column {column!r} (columns: {schema.names[:10]})")
    kind = schema.field(column).type
    if isinstance(kind, arrow.DictionaryType):  # dictionary-encoded (a pandas categorical): strings all the same
        kind = kind.value_type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column {column!r} holds {kind}, expected strings")
    rows = 0
    try:
        for batch in table.iter_batches(columns=[column], batch_size=1024):
            texts = batch.column(0).to_pylist()
            yield from ("" if text is None else text for text in texts)
            rows += len(texts)
    except (OSError, ValueError) as error:  # damaged pages: pyarrow's OSError or ArrowInvalid, invalid UTF-8
        raise DataError(f"{path}: damaged Parquet data after row {rows} of column {column!r} ({error})") from error


def read_utf8(path: Path) -> str:
    """The text of ``path`` without the byte-order mark some editors put first, which is no text."""
    try:
        return path.read_bytes().decode("utf-8").removeprefix(_BYTE_ORDER_MARK)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})") from error
