"""Data pipeline: tokenise once into memory-mapped files, then serve reproducible fixed-length samples."""

from megatron_unipool.data.blending import BlendedSamples
from megatron_unipool.data.corpus import (
    VALIDATION_PLAYS,
    WriteStats,
    holdout_count,
    play_of,
    prepare_default_corpus,
    shakespeare_documents,
    split_shakespeare,
    write_indexed,
)
from megatron_unipool.data.readers import read_documents
from megatron_unipool.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetWriter,
    publish_indexed,
    remove_indexed,
)
from megatron_unipool.data.errors import DataError
from megatron_unipool.data.samples import Samples, TokenSampleDataset
from megatron_unipool.data.tokenizers import (
    ByteTokenizer,
    GPT2Tokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    train_bpe_tokenizer,
)

__all__ = [
    "VALIDATION_PLAYS",
    "BlendedSamples",
    "ByteTokenizer",
    "DataError",
    "GPT2Tokenizer",
    "HFTokenizer",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "Samples",
    "TokenSampleDataset",
    "Tokenizer",
    "WriteStats",
    "build_tokenizer",
    "holdout_count",
    "play_of",
    "prepare_default_corpus",
    "publish_indexed",
    "read_documents",
    "remove_indexed",
    "shakespeare_documents",
    "split_shakespeare",
    "train_bpe_tokenizer",
    "write_indexed",
]
