"""Documents to token arrays, in order, optionally in worker processes that a signal can stop at any moment.

Not ``multiprocessing.Pool``. Its workers share one result queue, and a worker killed while writing to
it (by a SIGTERM to the whole process group, as ``timeout``, Slurm and Kubernetes send) holds that
queue's lock forever, so ``Pool.terminate()`` in the parent then blocks. Its ``imap`` also reads the
whole input ahead into its task queue and holds every result the other workers finish behind one long
document. Here each worker has pipes of its own, which the parent closes and kills without taking a
lock; chunk ``i`` goes to worker ``i % n`` and is read back from it, so results come in order with at
most ``CHUNKS_IN_FLIGHT`` chunks per worker read but not yet written.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import pickle
import queue
import signal
import threading
import traceback
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection

import numpy as np

from megatron_unipool.data.tokenizers import Tokenizer

CHUNK_DOCUMENTS = 16
CHUNK_CHARACTERS = 1 << 20  # a chunk ends once it holds this much text; a longer document goes alone
CHUNKS_IN_FLIGHT = 4  # per worker: enough to keep it busy while the parent writes the others' results
_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}
_EXIT_WAIT_S = 10.0  # for a worker to end on its own after its last chunk, before it is killed
_UTF8_SLICE = 1 << 20  # characters encoded at a time to count a long text's UTF-8 bytes


def encode(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, int]:
    """``(token ids, UTF-8 bytes of text)``."""
    return tokenizer.encode_as_array(text), utf8_length(text)


def utf8_length(text: str) -> int:
    """``len(text.encode("utf-8"))`` without a copy of a long text: ASCII is known without a scan, and other
    text is encoded a slice at a time."""
    if text.isascii():
        return len(text)
    return sum(len(text[start:start + _UTF8_SLICE].encode("utf-8")) for start in range(0, len(text), _UTF8_SLICE))


@contextlib.contextmanager
def encoded_documents(
    tokenizer: Tokenizer, documents: Iterable[str], workers: int
) -> Iterator[Iterator[tuple[np.ndarray, int]]]:
    """``encode`` of each of ``documents``, in order; with ``workers > 1`` in that many processes,
    which are gone when the block exits, however it exits."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        yield (encode(tokenizer, text) for text in documents)
        return
    with EncodingWorkers(tokenizer, workers) as pool:
        yield pool.encode(documents)


class EncodingWorkers:
    """``workers`` encoding processes, each fed and read through pipes of its own (see the module)."""

    def __init__(self, tokenizer: Tokenizer, workers: int):
        context = multiprocessing.get_context()
        self._context = context
        self._tokenizer = tokenizer
        self._tasks = [context.Pipe(duplex=False) for _ in range(workers)]  # (worker reads, parent writes)
        self._results = [context.Pipe(duplex=False) for _ in range(workers)]  # (parent reads, worker writes)
        self._processes: list[multiprocessing.process.BaseProcess] = []

    def __enter__(self) -> EncodingWorkers:
        try:
            with _interrupts_held():
                every_end = [end for pipe in self._tasks + self._results for end in pipe]
                for index, ((task_reader, _), (_, result_writer)) in enumerate(zip(self._tasks, self._results)):
                    # A forked worker holds every pipe end open at the fork: it closes all but its own, or
                    # a killed parent's pipes would never report end-of-file to the other workers.
                    others = [end for end in every_end if end is not task_reader and end is not result_writer]
                    process = self._context.Process(
                        target=_work, args=(self._tokenizer, task_reader, result_writer, others),
                        name=f"encoding-worker-{index}", daemon=True,
                    )
                    process.start()
                    self._processes.append(process)
        except BaseException:
            self._stop(kill=True)
            raise
        for (task_reader, _), (_, result_writer) in zip(self._tasks, self._results):
            task_reader.close()
            result_writer.close()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop(kill=exc_type is not None)

    def encode(self, documents: Iterable[str]) -> Iterator[tuple[np.ndarray, int]]:
        """``encode`` of each document, in order; reads at most ``CHUNKS_IN_FLIGHT`` chunks per worker ahead."""
        workers = len(self._processes)
        window = workers * CHUNKS_IN_FLIGHT
        chunks = _chunks(documents)
        in_flight: collections.deque[range] = collections.deque()  # the documents of each chunk sent, not received
        sent = documents_sent = 0
        while True:
            while len(in_flight) < window and (chunk := next(chunks, None)) is not None:
                in_flight.append(range(documents_sent, documents_sent + len(chunk)))
                try:
                    self._tasks[sent % workers][1].send(chunk)
                except OSError:  # it died since it took its last chunk
                    raise self._gone(sent % workers, in_flight[-1]) from None
                sent += 1
                documents_sent += len(chunk)
            if not in_flight:
                return
            yield from self._receive((sent - len(in_flight)) % workers, in_flight.popleft())

    def _receive(self, worker: int, chunk: range) -> list[tuple[np.ndarray, int]]:
        try:
            outcome = self._results[worker][0].recv()
        except (EOFError, OSError):
            raise self._gone(worker, chunk) from None
        if isinstance(outcome, BaseException):
            outcome.add_note(f"raised in {self._where(worker, chunk)}")
            raise outcome
        return outcome

    def _where(self, worker: int, chunk: range) -> str:
        return f"encoding worker {worker} (pid {self._processes[worker].pid}), on documents {chunk[0]}..{chunk[-1]}"

    def _gone(self, worker: int, chunk: range) -> ChildProcessError:
        """A worker that died (the kernel's OOM killer, a signal to it alone), found sending it a chunk or reading one back."""
        return ChildProcessError(f"{self._where(worker, chunk)}: {_how_it_ended(self._processes[worker])}")

    def _stop(self, kill: bool) -> None:
        """Closing its task pipe ends a worker once its chunks are done; after a failure, or past
        ``_EXIT_WAIT_S``, it is killed, which no lock shared with the parent can hold up."""
        for _, task_writer in self._tasks:
            task_writer.close()
        for result_reader, _ in self._results:  # a worker blocked sending a result no one will read ends at once
            result_reader.close()
        for process in self._processes:
            if not kill:
                process.join(_EXIT_WAIT_S)
            if process.is_alive():
                process.kill()
            process.join()


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    characters = 0
    for text in documents:
        chunk.append(text)
        characters += len(text)
        if len(chunk) == CHUNK_DOCUMENTS or characters >= CHUNK_CHARACTERS:
            yield chunk
            chunk, characters = [], 0
    if chunk:
        yield chunk


def _how_it_ended(process: multiprocessing.process.BaseProcess) -> str:
    process.join(_EXIT_WAIT_S)
    if process.exitcode is None:
        return "stopped answering"
    if process.exitcode < 0:
        name = signal.Signals(-process.exitcode).name
        return f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exited with status {process.exitcode}"


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Interrupts wait while the workers are forked: a KeyboardInterrupt raised in an at-fork hook would be
    lost (printed as "Exception ignored in ..."), and one raised inside Process.start() would leave a worker
    unregistered for clean-up. Blocking SIGINT/SIGTERM in this thread is not enough: the kernel hands a signal
    sent to the process to any thread that does not block it (a tokenizer's thread pool), and Python then runs
    the handler in the main thread at its next bytecode, wherever that is. So the handlers only note the
    signal meanwhile, and it is raised again once the workers are up. The workers inherit the mask and lift
    it (_work)."""
    noted: list[int] = []
    held = {}
    if threading.current_thread() is threading.main_thread():  # handlers run, and are set, there only
        for signum in sorted(_INTERRUPTS):
            if callable(signal.getsignal(signum)):
                held[signum] = signal.signal(signum, lambda signum, frame: noted.append(signum))
    interrupts_before = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, interrupts_before)
        for signum, handler in held.items():
            signal.signal(signum, handler)
        if noted:
            signal.raise_signal(noted[0])


def _work(tokenizer: Tokenizer, tasks: Connection, results: Connection, others: list[Connection]) -> None:
    """A worker: encodes chunks until its task pipe closes or its parent is gone.

    Interrupts are the parent's to handle: it stops the workers (SIGTERM, here the default: exit at once)
    and removes what it wrote, instead of every worker printing a KeyboardInterrupt traceback. A thread
    takes the chunks in as they come, so the parent never blocks sending one while this worker blocks
    sending it a result."""
    for end in others:
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _INTERRUPTS)
    chunks: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
    threading.Thread(target=_take_chunks, args=(tasks, chunks), daemon=True).start()
    while (chunk := chunks.get()) is not None:
        try:
            outcome = [encode(tokenizer, text) for text in chunk]
        except Exception as error:  # re-raised in the parent, with the documents it came from
            outcome = _sendable(error)
        try:
            results.send(outcome)
        except OSError:  # the parent is gone
            return


def _take_chunks(tasks: Connection, chunks: queue.SimpleQueue) -> None:
    try:
        while True:
            chunks.put(tasks.recv())
    except (EOFError, OSError):  # closed by the parent, or the parent is gone
        chunks.put(None)


def _sendable(error: Exception) -> Exception:
    """``error`` with the worker's traceback as a note (pickling drops tracebacks), or a RuntimeError
    saying what it was when it does not pickle."""
    error.add_note(f"worker traceback:\n{traceback.format_exc().rstrip()}")
    try:
        pickle.loads(pickle.dumps(error))  # some pickle, and then fail to unpickle in the parent
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error} (not picklable, so re-raised as RuntimeError)\n"
                            + "\n".join(error.__notes__))
    return error
