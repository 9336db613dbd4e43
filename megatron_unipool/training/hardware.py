"""GPU facts for the logs: utilisation/memory/power via nvidia-ml-py, and peak FLOP/s for MFU."""
from __future__ import annotations

import os
import re
from typing import Optional

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's datasheets. A key matches
# whole words of the device name, most specific first: "H100 NVL" before "H100", and "A10" matches
# neither "A10G" nor "RTX A1000" (cards with other peaks, left out: no MFU beats a wrong one).
PEAK_BF16_TFLOPS = {"H200 NVL": 835.0, "GH200": 989.0, "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                    "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_name() -> str:
    """What benchmark rows and logs call the device: the GPU's name, or the CPU with its core count."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def peak_bf16_tflops(name: str) -> Optional[float]:
    """The datasheet peak of the GPU called `name` (as CUDA reports it), or None when unknown."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", name):
            return tflops
    return None


def peak_flops() -> Optional[float]:
    """Peak dense bf16 FLOP/s of the current CUDA device, or None (CPU or unknown GPU: no MFU)."""
    if not torch.cuda.is_available():
        return None
    tflops = peak_bf16_tflops(torch.cuda.get_device_name())
    return tflops * 1e12 if tflops else None


class GpuMonitor:
    """Reads NVML counters of the current device; does nothing without a GPU or pynvml."""

    def __init__(self):
        self.handle = None
        if not torch.cuda.is_available():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.nvml = pynvml
        except Exception:  # NVML missing or refused: logs simply lack GPU stats
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        nvml = self.nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {
            "gpu/utilisation_percent": float(nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu),
            "gpu/memory_used_gib": memory.used / 2**30,
            "gpu/power_watts": nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
            "gpu/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
