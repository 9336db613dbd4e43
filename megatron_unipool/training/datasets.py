"""Training and validation samples for a config: the built-in corpus or preprocessed prefixes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import Config
from ..data import DataError, IndexedDataset, TokenSampleDataset, prepare_default_corpus


@dataclass
class RunData:
    train: TokenSampleDataset
    valid: TokenSampleDataset
    vocab_size: int  # of the tokenizer that wrote the files
    tokenizer: Optional[str]  # its name, as the training split's index records it (None: format version 1)

    def fingerprint(self) -> dict[str, str]:
        """What every rank must read alike, per split: node-local copies of the files (a node's own cache of
        the built-in corpus, a stale copy of a preprocessed prefix) can differ."""
        return {"training split": _fingerprint(self.train), "validation split": _fingerprint(self.valid)}


def build_datasets(config: Config) -> RunData:
    try:
        return _build_datasets(config)
    except OSError as e:  # the data modules' own errors (DataError) name the file and the problem already
        raise DataError(str(e)) from e


def _build_datasets(config: Config) -> RunData:
    data, model = config.data, config.model
    if data.corpus is not None:
        train_prefix, valid_prefix = prepare_default_corpus(data.tokenizer, data.cache_dir)
    else:
        train_prefix, valid_prefix = data.train_prefix, data.valid_prefix
    train, valid = IndexedDataset(train_prefix), IndexedDataset(valid_prefix)
    for name, split in (("data.train_prefix", train), ("data.valid_prefix", valid)):
        if split.vocab_size > model.vocab_size:
            source = (f"{name} was tokenised with" if data.corpus is None  # else the corpus cached with data.tokenizer
                      else f"data.tokenizer={data.tokenizer!r} (tokenising data.corpus={data.corpus!r}) has")
            raise DataError(
                f"{source} a vocabulary of {split.vocab_size} tokens, larger than"
                f" model.vocab_size={model.vocab_size}: raise model.vocab_size to at least {split.vocab_size}"
            )
    named = {train.tokenizer, valid.tokenizer} - {None}  # an index of format version 1 names no tokenizer
    if len(named) > 1 or (train.vocab_size, train.eod_id) != (valid.vocab_size, valid.eod_id):
        raise DataError(f"train and validation files come from different tokenizers: {train_prefix}"
                        f" ({_tokenizer_of(train)}), {valid_prefix} ({_tokenizer_of(valid)})")
    valid_samples = TokenSampleDataset(valid, model.seq_len, config.train.seed, unshuffled=True)
    if len(valid_samples) < config.train.micro_batch:  # evaluation would get no batch: refuse before training
        raise DataError(
            f"{valid_prefix} holds {len(valid_samples)} validation samples of model.seq_len={model.seq_len}, fewer"
            f" than train.micro_batch={config.train.micro_batch} needed for one evaluation batch: lower"
            " train.micro_batch or model.seq_len, or use a larger validation split"
        )
    return RunData(
        train=TokenSampleDataset(train, model.seq_len, config.train.seed),
        valid=valid_samples,
        vocab_size=train.vocab_size,
        tokenizer=train.tokenizer,
    )


def _fingerprint(samples: TokenSampleDataset) -> str:
    split = samples.dataset
    return (f"{len(samples):,} samples, {split.num_documents:,} documents, {split.num_tokens:,} tokens"
            f" ({_tokenizer_of(split)}), content hash {split.content_hash()}")


def _tokenizer_of(split: IndexedDataset) -> str:
    return f"tokenizer {split.tokenizer or 'not recorded'}, vocabulary {split.vocab_size}, EOD id {split.eod_id}"


def seq_len_note(seq_len: int, saved_seq_len: int, whose: str, consumed_samples: int) -> Optional[str]:
    """What continuing at `consumed_samples` means when they counted samples of another length (`whose` run
    counted them: "the checkpoint's"), or None at the same length."""
    if seq_len == saved_seq_len:
        return None
    return (f"note: model.seq_len={seq_len}, {whose} run had {saved_seq_len}: the run continues at sample"
            f" {consumed_samples:,} of {seq_len}-token samples, not at the token where {whose} data stopped")


def validation_batches(valid: TokenSampleDataset, micro_batch: int, sequences: int) -> list[torch.Tensor]:
    """`sequences` samples spread evenly over the validation split (its first samples alone would be one
    play's cast list), in micro-batches; a split holding fewer gives all of its samples, rounded down to
    whole micro-batches."""
    count = min(sequences, len(valid)) // micro_batch * micro_batch
    positions = np.linspace(0, len(valid) - 1, count).round().astype(np.int64)
    return [torch.from_numpy(np.stack([valid.sample(int(g)) for g in positions[i: i + micro_batch]]))
            for i in range(0, count, micro_batch)]


def replica_share(batches: list, dp: int, dp_rank: int) -> list:
    """The micro-batches one of `dp` data-parallel replicas evaluates: every dp-th, when they divide evenly
    (they do whenever the split holds eval_batches global batches, as a global batch is dp whole shares),
    so that the replicas together evaluate each batch once; else all of them, as each replica then must
    run the same number of micro-batches (expert-parallel all-to-alls pair them) and the mean must not
    depend on dp."""
    return batches[dp_rank::dp] if len(batches) % dp == 0 else batches
