"""Installs the megatron_unipool library (launch/, tools/ and benchmarks/ are run as scripts)."""
from setuptools import find_packages, setup

setup(
    name="megatron_unipool",
    version="0.1.0",
    description="Pretraining backend for Mixture-of-Experts LLMs with one expert pool shared by all layers",
    packages=find_packages(include=["megatron_unipool", "megatron_unipool.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # nn.utils.get_total_norm / clip_grads_with_norm_ (training/distributed.py); SDPA's enable_gqa
        "numpy",
        "tokenizers>=0.15",
        "tiktoken",
        "tensorboard",
        "matplotlib",
        "scipy>=1.9",  # UniPool-lock assignment (milp with HiGHS)
        "nvidia-ml-py",
        "psutil",  # host memory available (training/hardware.py)
        "safetensors",
        "deepspeed>=0.15",  # the launcher and init_distributed
    ],
    extras_require={
        "data": ["zstandard", "pyarrow"],  # .jsonl.zst and Parquet inputs of tools/preprocess_data.py
        # transformers: tests/test_hf_interop.py; the data extra: the readers' tests
        "test": ["pytest", "pytest-timeout", "transformers>=5.0", "zstandard", "pyarrow"],
    },
)
