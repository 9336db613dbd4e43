"""Machine facts: GPU utilisation/memory/power via nvidia-ml-py and peak FLOP/s for MFU for the logs, and
the host memory a model must fit before it is built."""
from __future__ import annotations

import os
import re
from typing import Optional

import psutil
import torch

from ..config import ConfigError

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's datasheets. A key matches
# whole words of the device name, most specific first: "H100 NVL" before "H100", and "A10" matches
# neither "A10G" nor "RTX A1000" (cards with other peaks, left out: no MFU beats a wrong one).
PEAK_BF16_TFLOPS = {"H200 NVL": 835.0, "GH200": 989.0, "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                    "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_name() -> str:
    """What benchmark rows and logs call the device: the GPU's name, or the CPU with its core count and
    the threads torch computes with (OMP_NUM_THREADS), which CPU timings depend on."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"cpu ({os.cpu_count()} cores, {threads} thread{'s' * (threads != 1)})"


def peak_bf16_tflops(name: str) -> Optional[float]:
    """The datasheet peak of the GPU called `name` (as CUDA reports it), or None when unknown, and for a
    MIG slice ("... MIG 1g.10gb"), which has a share of the card's SMs."""
    if re.search(r"(?<!\w)MIG(?!\w)", name):
        return None
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", name):
            return tflops
    return None


def trains_on_a_gpu(device: Optional[torch.device]) -> bool:
    """Whether `device` (default: the current CUDA device, if any) is a GPU; a run on the CPU of a GPU
    machine reports neither MFU nor the idle GPU's counters."""
    return torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")


def available_host_memory() -> Optional[int]:
    """Bytes of host memory available to new allocations (psutil's `available`: Linux's MemAvailable,
    and its like on other systems), or None where the system does not say."""
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError):
        return None


def processes_on_this_host() -> int:
    """How many processes of the job this host runs: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's
    LOCAL_SIZE, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    return 1


def check_fits_host_memory(params: int, what: str, copies: int = 1) -> None:
    """A ConfigError before `copies` x `params` fp32 parameters are allocated in host memory that cannot hold
    them (every rank builds the full model before it is sharded): a size typed wrong fails here, in one line,
    not in the allocator's traceback or the kernel's OOM killer."""
    available, needed = available_host_memory(), 4 * params * copies
    if available is not None and needed > available:
        each = f", on each of the {copies} processes of this host," if copies > 1 else ""
        raise ConfigError(f"{what} holds {params:,} parameters{each} {needed / 2**30:,.1f} GiB in fp32 in all:"
                          f" more than the {available / 2**30:,.1f} GiB of host memory available")


def peak_flops(precision: str = "bf16", device: Optional[torch.device] = None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of the CUDA device the run trains on, or None (CPU, unknown GPU, or an fp32
    run, whose GEMMs do not run at that peak: no MFU)."""
    if precision != "bf16" or not trains_on_a_gpu(device):
        return None
    tflops = peak_bf16_tflops(torch.cuda.get_device_name())
    return tflops * 1e12 if tflops else None


class GpuMonitor:
    """NVML counters of the current device for the logs, read through torch.cuda, which finds the
    device NVML means under CUDA_VISIBLE_DEVICES. A counter the GPU does not offer (MIG slices,
    some virtual GPUs) or that cannot be read (no nvidia-ml-py) is left out of the logs after one
    note; telemetry never stops a run."""

    COUNTERS = {
        "gpu/utilisation_percent": lambda: float(torch.cuda.utilization()),
        "gpu/memory_used_gib": lambda: torch.cuda.device_memory_used() / 2**30,
        "gpu/power_watts": lambda: torch.cuda.power_draw() / 1000.0,
    }

    def __init__(self, device: Optional[torch.device] = None):
        self.on_gpu = trains_on_a_gpu(device)
        self.counters = dict(self.COUNTERS) if self.on_gpu else {}

    def read(self) -> dict[str, float]:
        if not self.on_gpu:
            return {}
        values = {"gpu/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
        dropped: dict[str, list[str]] = {}  # reason -> counters: one note for a cause they share (no nvidia-ml-py)
        for name, counter in list(self.counters.items()):
            try:
                values[name] = counter()
            except Exception as e:  # NVMLError_NotSupported, no pynvml, ...: this counter is not logged
                del self.counters[name]
                dropped.setdefault(f"{type(e).__name__}: {e}", []).append(name)
        for reason, names in dropped.items():
            print(f"note: {', '.join(names)} {'is' if len(names) == 1 else 'are'} not logged: {reason}", flush=True)
        return values
