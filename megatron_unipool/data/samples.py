"""Fixed-length training samples with a seeded shuffle that is a pure function of the sample index.

The whole token stream is cut into back-to-back windows of ``seq_len + 1``
tokens (neighbouring windows share one token, so every token is a label once).
Documents already end with EOD, so windows may span document boundaries, as in
GPT pretraining.

Global sample index ``g`` counts samples across epochs.  It maps to epoch
``g // num_samples`` and to window ``permutation(epoch)[g % num_samples]``,
where the permutation depends only on ``(seed, epoch)``.  Resuming a run
therefore needs nothing but the number of samples already consumed.
"""

from __future__ import annotations

import abc

import numpy as np
import torch

from megatron_unipool.data.errors import DataError
from megatron_unipool.data.indexed_dataset import IndexedDataset


class Samples(abc.ABC):
    """What training reads: samples of ``seq_len + 1`` tokens by global index, a pure function of it."""

    seq_len: int

    @abc.abstractmethod
    def __len__(self) -> int:
        """Samples of one pass over the data."""

    @abc.abstractmethod
    def sample(self, global_index: int) -> np.ndarray:
        """``seq_len + 1`` tokens (int64) of global sample ``global_index``."""

    def batch(self, start: int, batch_size: int) -> torch.Tensor:
        """Samples ``start .. start + batch_size - 1`` as a LongTensor ``[batch_size, seq_len + 1]``."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        rows = [self.sample(index) for index in range(start, start + batch_size)]
        return torch.from_numpy(np.stack(rows))


class TokenSampleDataset(Samples):
    """Windows of ``seq_len + 1`` tokens of one file: inputs are ``[:-1]``, labels ``[1:]``."""

    def __init__(self, dataset: IndexedDataset, seq_len: int, seed: int, unshuffled: bool = False):
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        if seed < 0:
            raise DataError(f"seed must be >= 0 (numpy SeedSequence), got {seed}")
        num_samples = (dataset.num_tokens - 1) // seq_len
        if num_samples < 1:
            raise DataError(
                f"{dataset.bin_path} holds {dataset.num_tokens} tokens, too few for one sample of "
                f"seq_len={seq_len} (needs seq_len + 1 = {seq_len + 1})"
            )
        self.dataset = dataset
        self.seq_len = seq_len
        self.seed = seed
        self.unshuffled = unshuffled
        self.num_samples = num_samples
        self._cached_epoch: int | None = None
        self._cached_permutation: np.ndarray | None = None

    def __len__(self) -> int:
        """Samples per epoch."""
        return self.num_samples

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """Window order of ``epoch``; only the latest epoch's is kept, as reads are sequential."""
        if epoch != self._cached_epoch:
            self._cached_permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._cached_epoch = epoch
        return self._cached_permutation

    def window_index(self, global_index: int) -> int:
        """Which window of the token stream global sample ``global_index`` reads."""
        if global_index < 0:
            raise IndexError(f"global sample index must be >= 0, got {global_index}")
        epoch, position = divmod(global_index, self.num_samples)
        if self.unshuffled:
            return position
        return int(self.epoch_permutation(epoch)[position])

    def sample(self, global_index: int) -> np.ndarray:
        start = self.window_index(global_index) * self.seq_len
        tokens = self.dataset.tokens(start, start + self.seq_len + 1).astype(np.int64)
        largest = int(tokens.max())  # stored unsigned: only the top can leave the vocabulary
        if largest >= self.dataset.vocab_size:  # an embedding lookup would fail (on CUDA: a device-side assert)
            raise DataError(
                f"{self.dataset.bin_path}: token id {largest} in tokens [{start}, {start + self.seq_len + 1}) is"
                f" outside the vocabulary [0, {self.dataset.vocab_size}) its index records; the file is damaged"
            )
        return tokens
