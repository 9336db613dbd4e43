"""Shared fixtures: the default corpus is tokenised once per test session into a temporary cache."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton reads it when imported: its kernels then run on CPU tensors, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (only where a test asks for them: "auto" takes them on CUDA only)

from megatron_unipool.config import load_config


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def tiny_config(data_cache):
    """A small, fast variant of the default config; keyword args are `section.key` overrides."""

    def make(config_file="configs/tiny_unipool_cpu.json", *overrides):
        base = [f"data.cache_dir={data_cache}", "logging.tensorboard=false", "model.seq_len=64",
                "train.global_batch=8", "train.micro_batch=4", "train.eval_batches=1", "checkpoint.save_interval=0"]
        return load_config(config_file, base + list(overrides))

    return make


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add contention on a 2-core machine (seconds per test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_runs():
    """Triton kernels run here: compiled on CUDA, interpreted on a CPU (TRITON_INTERPRET, set above)."""
    from megatron_unipool.kernels import triton_support

    if triton_support.triton is None:
        pytest.skip("Triton is not installed")
    if not (torch.cuda.is_available() or triton_support.interpreting()):
        pytest.skip("no CUDA device, and Triton was imported without TRITON_INTERPRET=1")
