"""Encoding workers: same ids as one process, bounded read-ahead, and nothing left running however they end."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_unipool.data import ByteTokenizer, GPT2Tokenizer
from megatron_unipool.data import encoding
from megatron_unipool.data.encoding import encoded_documents

REPO_ROOT = Path(__file__).resolve().parent.parent


class UnpicklableError(Exception):
    """Pickles, but its two-argument __init__ fails when the parent unpickles it."""

    def __init__(self, document: str, reason: str):
        super().__init__(f"{document!r}: {reason}")


class ScriptedTokenizer(ByteTokenizer):
    """The byte tokenizer, with texts that make the process encoding them sleep, raise or die."""

    def encode_as_array(self, text: str) -> np.ndarray:
        if text.startswith("SLEEP "):
            time.sleep(float(text.split()[1]))
        if text == "RAISE":
            raise ValueError("cannot encode RAISE")
        if text == "RAISE UNPICKLABLE":
            raise UnpicklableError(text, "unsupported")
        if text == "DIE":
            os.kill(os.getpid(), signal.SIGKILL)
        if text == "HUGE":  # more than a pipe holds: its worker blocks sending it until the parent reads
            return np.zeros(64 << 20, dtype=np.uint8)
        return super().encode_as_array(text)


def encode_all(tokenizer, documents, workers):
    with encoded_documents(tokenizer, documents, workers) as encoded:
        return [(ids.tolist(), num_bytes) for ids, num_bytes in encoded]


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that only its (new) parent has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_workers_give_one_process_ids_in_order(monkeypatch):
    """Chunks end at CHUNK_DOCUMENTS documents or CHUNK_CHARACTERS of text (a longer document goes alone),
    go round the workers and come back in order: uneven sizes make the workers finish out of order."""
    monkeypatch.setattr(encoding, "CHUNK_CHARACTERS", 3000)
    rng = np.random.default_rng(0)
    documents = ["é" * int(rng.integers(1, 5000 if i % 9 == 0 else 50)) + f" {i}" for i in range(203)]
    tokenizer = ByteTokenizer()
    serial = encode_all(tokenizer, documents, workers=1)
    assert [ids for ids, _ in serial] == [list(text.encode("utf-8")) for text in documents]
    assert [num_bytes for _, num_bytes in serial] == [len(text.encode("utf-8")) for text in documents]
    assert encode_all(tokenizer, documents, workers=3) == serial
    assert encode_all(tokenizer, iter(documents[:5]), workers=4) == serial[:5]  # fewer chunks than workers


def test_gpt2_array_ids_are_its_ordinary_ids():
    """GPT-2 encodes straight into a uint32 array: the same ids as encode_ordinary, text spelling a special
    token included, in 4 bytes a token."""
    try:
        tokenizer = GPT2Tokenizer()
    except FileNotFoundError as error:
        pytest.skip(f"GPT-2 ranks not installed: {error}")
    text = "Hello <|endoftext|> world, naïve café 🎭"
    ids = tokenizer.encode_as_array(text)
    assert ids.dtype == np.uint32 and ids.tolist() == tokenizer.encode(text)
    assert tokenizer.eod_id not in ids


def test_workers_read_a_bounded_window_ahead_of_a_slow_worker():
    """Behind one slow document, the parent reads at most CHUNKS_IN_FLIGHT chunks per worker of the input;
    multiprocessing.Pool.imap read all of it ahead, and kept every result the other workers finished."""
    pulled = 0

    def documents():
        nonlocal pulled
        for text in ["SLEEP 1.5", *(["a"] * 20_000)]:
            pulled += 1
            yield text

    workers = 2
    with encoded_documents(ScriptedTokenizer(), documents(), workers) as encoded:
        first_ids, _ = next(encoded)
        pulled_behind_the_slow_document = pulled
        rest = sum(1 for _ in encoded)
    assert bytes(first_ids) == b"SLEEP 1.5" and rest == 20_000
    assert pulled_behind_the_slow_document <= workers * encoding.CHUNKS_IN_FLIGHT * encoding.CHUNK_DOCUMENTS


def test_a_worker_error_is_raised_with_its_documents_and_no_worker_outlives_it():
    with pytest.raises(ValueError, match="cannot encode RAISE") as raised:
        encode_all(ScriptedTokenizer(), ["a"] * 20 + ["RAISE"], workers=2)
    notes = "\n".join(raised.value.__notes__)
    assert "raised in encoding worker 1" in notes and "on documents 16..20" in notes, notes
    assert "worker traceback" in notes and "cannot encode RAISE" in notes


def test_an_error_that_does_not_unpickle_is_still_reported():
    with pytest.raises(RuntimeError, match=r"UnpicklableError: 'RAISE UNPICKLABLE': unsupported \(not picklable") as raised:
        encode_all(ScriptedTokenizer(), ["a", "RAISE UNPICKLABLE"], workers=2)
    assert "worker traceback" in str(raised.value) and "raised in encoding worker 0" in "\n".join(raised.value.__notes__)


def test_a_worker_dead_before_its_next_chunk_is_reported():
    """Worker 0 dies in its second chunk (documents 32..47) while the writer is slow with the first result:
    sending it its next chunk (documents 128..143) fails, and says which worker died and how, not just
    "Broken pipe"."""
    documents = ["a"] * 32 + ["DIE"] + ["c"] * 2000
    with pytest.raises(ChildProcessError, match=r"encoding worker 0 \(pid \d+\), on documents 128..143: was killed by "
                                                r"SIGKILL"):
        with encoded_documents(ScriptedTokenizer(), documents, workers=2) as encoded:
            next(encoded)
            time.sleep(1)
            list(encoded)


def test_the_block_exits_at_once_when_its_reader_stops_early():
    """A reader that leaves the block without an exception (a `break`): the workers blocked sending results
    no one reads end at once, not after waiting out their exit time."""
    started = time.monotonic()
    with encoded_documents(ByteTokenizer(), ["x" * 200_000] * 40, workers=2) as encoded:
        next(encoded)
    assert time.monotonic() - started < encoding._EXIT_WAIT_S / 2 and not encoding_workers()
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        encode_all(ByteTokenizer(), ["a"], workers=0)


def test_a_killed_worker_is_reported_not_waited_for():
    """A worker the kernel kills (out of memory) fails the run at once and says so; Pool waited forever."""
    with pytest.raises(ChildProcessError, match=r"encoding worker 0 \(pid \d+\), on documents 0..5: was killed by "
                                                r"SIGKILL \(out of memory\?\)"):
        encode_all(ScriptedTokenizer(), ["a"] * 5 + ["DIE"], workers=2)


def encoding_workers() -> dict[str, int]:
    return {child.name: child.pid for child in multiprocessing.active_children()
            if child.name.startswith("encoding-worker-")}


def test_a_worker_killed_while_sending_a_result_holds_nothing_up():
    """multiprocessing.Pool's workers shared a result queue: one killed while it held the queue's lock
    (mid-result, as a SIGTERM to the process group finds them) blocked Pool.terminate() for ever. A worker
    here holds no lock the parent takes: reading from it fails at once, and stopping the others returns."""
    started = time.monotonic()
    with pytest.raises(ChildProcessError, match=r"encoding worker 1 \(pid \d+\), on documents 16..16: was "
                                                r"killed by SIGTERM"):
        with encoded_documents(ScriptedTokenizer(), ["a"] * encoding.CHUNK_DOCUMENTS + ["HUGE"], workers=2) as encoded:
            next(encoded)
            pid = encoding_workers()["encoding-worker-1"]
            time.sleep(0.5)  # it is now blocked partway through sending 64 MB
            os.kill(pid, signal.SIGTERM)
            list(encoded)
    assert time.monotonic() - started < 10 and gone(pid) and not encoding_workers()


def test_workers_are_gone_after_the_block_however_it_ends():
    tokenizer = ScriptedTokenizer()
    with encoded_documents(tokenizer, ["a"] * 100, workers=2) as encoded:
        next(encoded)
        pids = list(encoding_workers().values())
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="stopped by the writer"):
        with encoded_documents(tokenizer, ["a"] * encoding.CHUNK_DOCUMENTS + ["SLEEP 30"], workers=2) as encoded:
            next(encoded)  # the second worker now sleeps in its chunk
            pids += encoding_workers().values()
            raise RuntimeError("stopped by the writer")
    assert time.monotonic() - started < 10  # killed at once, not after their 30 s
    assert len(pids) == 4 and all(gone(pid) for pid in pids) and not encoding_workers()


# Starts two workers on slow documents, prints their pids, then waits in the encoding loop to be killed.
PARENT_KILLED_MID_ENCODING = """
import sys
sys.path.insert(0, sys.argv[1])
from test_encoding import ScriptedTokenizer
from megatron_unipool.data.encoding import EncodingWorkers
with EncodingWorkers(ScriptedTokenizer(), 2) as workers:
    print(*(process.pid for process in workers._processes), flush=True)
    for _ in workers.encode(["SLEEP 0.2"] * 1000):
        pass
"""


def test_workers_end_when_their_parent_is_killed():
    """A SIGKILLed parent runs no clean-up: each worker then sees its pipes close and ends. It sees that only
    because it closed the ends it inherited of the parent's other pipes when forked."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT_KILLED_MID_ENCODING, str(Path(__file__).parent)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        time.sleep(0.5)
    finally:
        parent.kill()
        parent.wait()
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pids if not gone(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors


def test_utf8_length_counts_a_long_text_a_slice_at_a_time(monkeypatch):
    monkeypatch.setattr(encoding, "_UTF8_SLICE", 3)
    for text in ["", "ascii only", "naïve café", "🎭🐍 emoji" * 5, "日本語" * 7 + "x"]:
        assert encoding.utf8_length(text) == len(text.encode("utf-8")), text
