"""Training and validation samples for a config: the built-in corpus or preprocessed prefixes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import Config, as_blend
from ..data import BlendedSamples, DataError, IndexedDataset, Samples, TokenSampleDataset, prepare_default_corpus


@dataclass
class RunData:
    train: Samples  # one preprocessed file's samples, or a blend of several files' (data.train_prefix)
    valid: Samples
    vocab_size: int  # of the tokenizer that wrote the files
    eod_id: int  # its end-of-document id, which ends each document in the files (model.document_masking)
    tokenizer: Optional[str]  # its name, as the training split's index records it (None: format version 1)

    def fingerprint(self) -> dict[str, str]:
        """What every rank must read alike, per split: node-local copies of the files (a node's own cache of
        the built-in corpus, a stale copy of a preprocessed prefix) can differ."""
        return {"training split": _fingerprint(self.train), "validation split": _fingerprint(self.valid)}

    def training_hashes(self) -> dict[str, str]:
        """Each training file's content hash (IndexedDataset.content_hash), by prefix."""
        files = self.train.sources if isinstance(self.train, BlendedSamples) else [self.train]
        return {str(samples.dataset.bin_path.with_suffix("")): samples.dataset.content_hash() for samples in files}

    def training_content(self) -> str:
        """The training files' content hashes, sorted: what a resume compares to know that it reads on in the data
        its checkpoint stopped in, wherever the files lie now and at any sample length."""
        return ", ".join(sorted(self.training_hashes().values()))


def build_datasets(config: Config) -> RunData:
    try:
        return _build_datasets(config)
    except OSError as e:  # the data modules' own errors (DataError) name the file and the problem already
        raise DataError(str(e)) from e


def _build_datasets(config: Config) -> RunData:
    data, model = config.data, config.model
    if data.corpus is not None:
        train_blend, valid_blend = map(as_blend, prepare_default_corpus(data.tokenizer, data.cache_dir))
    else:
        train_blend, valid_blend = as_blend(data.train_prefix), as_blend(data.valid_prefix)
    files = {prefix: IndexedDataset(prefix) for prefix in (*train_blend, *valid_blend)}
    for field, blend in (("data.train_prefix", train_blend), ("data.valid_prefix", valid_blend)):
        for prefix in blend:
            split = files[prefix]
            if split.vocab_size > model.vocab_size:
                source = (f"data.tokenizer={data.tokenizer!r} (tokenising data.corpus={data.corpus!r}) has"
                          if data.corpus is not None  # the corpus cached with data.tokenizer
                          else f"{field} was tokenised with" if len(blend) == 1
                          else f"{field}'s {prefix} was tokenised with")
                raise DataError(
                    f"{source} a vocabulary of {split.vocab_size} tokens, larger than"
                    f" model.vocab_size={model.vocab_size}: raise model.vocab_size to at least {split.vocab_size}"
                )
    named = {split.tokenizer for split in files.values()} - {None}  # an index of format version 1 names none
    if len(named) > 1 or len({(split.vocab_size, split.eod_id) for split in files.values()}) > 1:
        which = "train and validation files" if len(files) == 2 else "the data files"
        raise DataError(f"{which} come from different tokenizers: "
                        + ", ".join(f"{prefix} ({_tokenizer_of(split)})" for prefix, split in files.items()))
    valid_samples = _samples(valid_blend, files, model.seq_len, config.train.seed, unshuffled=True)
    evaluated = (zip(valid_samples.names, valid_samples.sources) if data.valid_per_file
                 else [(_named(valid_blend), valid_samples)])
    for name, samples in evaluated:
        if len(samples) < config.train.micro_batch:  # evaluation would get no batch: refuse before training
            raise DataError(
                f"{name} holds {len(samples)} validation samples of model.seq_len={model.seq_len}, fewer than"
                f" train.micro_batch={config.train.micro_batch} needed for one evaluation batch: lower"
                " train.micro_batch or model.seq_len, or use a larger validation split"
                + (" (data.valid_per_file evaluates each file on its own)" if data.valid_per_file else "")
            )
    first = files[next(iter(train_blend))]
    return RunData(
        train=_samples(train_blend, files, model.seq_len, config.train.seed),
        valid=valid_samples,
        vocab_size=first.vocab_size,
        eod_id=first.eod_id,
        tokenizer=first.tokenizer,
    )


def _samples(blend: dict[str, float], files: dict[str, IndexedDataset], seq_len: int, seed: int,
             unshuffled: bool = False) -> Samples:
    """One file's samples, or the blend of several in the order of their paths: a blend is a set of weighted
    files, so writing its entries in another order reads the same samples."""
    sources = [(prefix, TokenSampleDataset(files[prefix], seq_len, seed, unshuffled), weight)
               for prefix, weight in sorted(blend.items())]
    return sources[0][1] if len(sources) == 1 else BlendedSamples(sources)


def _named(blend: dict[str, float]) -> str:
    return next(iter(blend)) if len(blend) == 1 else "the blend of " + ", ".join(sorted(blend))


def blend_note(train: Samples, samples_per_step: int, steps: int) -> Optional[str]:
    """What a blended training split reads of each file over `steps` steps (how often a small file weighted
    high repeats), or None for one file."""
    if not isinstance(train, BlendedSamples):
        return None
    total = samples_per_step * steps
    parts = [f"{name} {share / train.period:.1%} ({len(source):,} samples, read"
             f" {train.source_samples(index, total) / len(source):.2f} times)"
             for index, (name, source, share) in enumerate(zip(train.names, train.sources, train.shares))]
    return f"data: a blend of {len(parts)} files over {steps:,} steps: " + "; ".join(parts)


def _fingerprint(samples: Samples) -> str:
    if isinstance(samples, BlendedSamples):
        return "; ".join(f"{name} x {share}/{samples.period}: {_fingerprint(source)}"
                         for name, source, share in zip(samples.names, samples.sources, samples.shares))
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


def validation_batches(valid: Samples, micro_batch: int, sequences: int) -> list[torch.Tensor]:
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
