"""Several sample sources mixed by weight (Megatron's data blend), still a pure function of the sample index.

Samples are dealt in periods of ``PERIOD``. Each source gets a fixed share of every period (its weight's,
rounded by largest remainder) spread evenly through it: its j-th sample of a period sits where the fraction
(j + 1/2) / share of the period falls, ties to the source listed first. So the first n samples of a period
hold n * share / PERIOD of a source's, give or take 1/2 + (K - 2) / 2 * share / PERIOD for K sources: half a
sample for two, at most (K - 1) / 2. Global sample ``g`` is position
``g % PERIOD`` of period ``g // PERIOD``, which names one source and that source's own sample index
(``period * share + j``) with no state, so a run resumes from the consumed-sample count alone, as with one
source. Each source keeps its own seeded shuffle and epochs: a small source weighted high is read several
times while a large one is still in its first epoch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron_unipool.data.errors import DataError
from megatron_unipool.data.samples import Samples

PERIOD = 1 << 16  # shares are weights rounded to 1/65536 of the samples


def period_shares(weights: Sequence[float], period: int = PERIOD) -> np.ndarray:
    """Samples of each source per period: the weights' proportions of `period`, rounded down, then the rest
    one each to the largest remainders (ties to the first source), so they sum to `period` exactly."""
    scaled = np.asarray(weights, dtype=np.float64) / np.max(weights)  # a sum of weights near 1e308 is no inf
    exact = scaled / scaled.sum() * period
    shares = np.floor(exact).astype(np.int64)
    remainders = exact - shares
    shares[np.argsort(-remainders, kind="stable")[: period - int(shares.sum())]] += 1
    return shares


class BlendedSamples(Samples):
    """`sources` (name, samples, weight) interleaved in proportion to their weights, in the order given."""

    def __init__(self, sources: Sequence[tuple[str, Samples, float]], period: int = PERIOD):
        if not sources:
            raise DataError("a blend needs at least one source")
        seq_lens = {samples.seq_len for _, samples, _ in sources}
        if len(seq_lens) != 1:
            raise DataError(f"blended sources must have one sample length, got {sorted(seq_lens)}")
        self.names = [name for name, _, _ in sources]
        self.sources = [samples for _, samples, _ in sources]
        self.seq_len = seq_lens.pop()
        self.period = period
        weights = [weight for _, _, weight in sources]
        self.shares = period_shares(weights, period)
        for name, share, weight in zip(self.names, self.shares, weights):
            if share == 0:
                fraction = weight / max(weights) / sum(w / max(weights) for w in weights)
                raise DataError(f"{name}'s weight {weight:g} is {fraction:.2g} of the blend, less than one sample in"
                                f" {period:,}: raise it or leave the source out")
        # each source's j-th sample of a period at the fraction (2j + 1) / (2 share) of it: the float keys are
        # exact enough to order (distinct fractions of denominators <= 2 * period differ by far more than an ulp)
        source_of_key = np.repeat(np.arange(len(self.sources)), self.shares)
        rank_of_key = np.concatenate([np.arange(share) for share in self.shares])
        keys = (2 * rank_of_key + 1) / (2.0 * self.shares[source_of_key])
        order = np.argsort(keys, kind="stable")  # stable: equal fractions keep the sources' order
        self._source_at = source_of_key[order]
        self._rank_at = rank_of_key[order]
        self._position_of = np.empty(period, dtype=np.int64)  # key (source's block, rank) -> position in the period
        self._position_of[order] = np.arange(period)
        self._first_key = np.concatenate([[0], np.cumsum(self.shares)[:-1]])

    def __len__(self) -> int:
        """Samples before the first source to run out starts its second epoch: a pass over the blend."""
        return min(self._index_of(source, len(samples)) for source, samples in enumerate(self.sources))

    def source_samples(self, source: int, count: int) -> int:
        """How many of the first `count` global samples `source` gives (what a run of `count` samples reads
        of it)."""
        periods, position = divmod(count, self.period)
        within = np.count_nonzero(self._source_at[:position] == source)
        return periods * int(self.shares[source]) + within

    def locate(self, global_index: int) -> tuple[int, int]:
        """(source, that source's own sample index) of global sample `global_index`."""
        if global_index < 0:
            raise IndexError(f"global sample index must be >= 0, got {global_index}")
        periods, position = divmod(global_index, self.period)
        source = int(self._source_at[position])
        return source, periods * int(self.shares[source]) + int(self._rank_at[position])

    def sample(self, global_index: int) -> np.ndarray:
        source, index = self.locate(global_index)
        return self.sources[source].sample(index)

    def _index_of(self, source: int, index: int) -> int:
        """The global index of `source`'s own sample `index`."""
        periods, rank = divmod(index, int(self.shares[source]))
        return periods * self.period + int(self._position_of[self._first_key[source] + rank])
