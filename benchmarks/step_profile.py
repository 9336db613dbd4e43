"""Where a training step's time goes: torch.profiler over a few steps, summarised as device time per
kernel category, the busiest kernels, how many kernels a step launches, and how much of the wall
time the device was busy (well under 100% means the step waits on the host: Python, launches, syncs);
and, between two models' profiles, where one's extra device time goes (by category and by kernel).

On CUDA the summary counts GPU kernels and copies; on CPU it counts operators' self CPU time.
"""
from __future__ import annotations

import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# first match wins: names are lower-cased kernel names (CUDA) or aten operators (CPU)
CATEGORIES = (
    ("optimizer", ("adam", "multi_tensor_apply")),
    ("attention", ("flash", "fmha", "attention", "scaled_dot_product")),
    ("grouped gemm", ("grouped_mm", "groupproblemshape", "grouped")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "aten::to", "aten::zero")),
    ("sort / scan / index", ("sort", "scan", "index", "scatter", "gather", "histogram", "bincount", "cumsum",
                             "topk", "radix")),
    ("cross entropy / softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("reduction", ("reduce", "norm", "sum", "mean", "amax")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "aten::mul", "aten::add", "aten::silu", "aten::div")),
)


def categorise(name: str) -> str:
    lowered = name.lower()
    return next((category for category, keys in CATEGORIES if any(key in lowered for key in keys)), "other")


def profile_steps(step, steps: int, top: int = 12) -> dict:
    """Run `step()` `steps` times under torch.profiler; per-step milliseconds by category and kernel."""
    on_cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if on_cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    return summarise(prof.key_averages(), steps, wall, on_cuda, top)


def summarise(averages, steps: int, wall_seconds: float, on_cuda: bool, top: int) -> dict:
    """`averages`: the profiler's key_averages(); device kernels on CUDA, operators' self time on CPU."""
    if on_cuda:
        # user annotations (Optimizer.step#AdamW.step) span kernels already counted
        timed = [(e.key, e.self_device_time_total, e.count) for e in averages
                 if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0 and not e.is_user_annotation]
    else:
        timed = [(e.key, e.self_cpu_time_total, e.count) for e in averages
                 if e.self_cpu_time_total > 0 and e.key.startswith("aten::")]
    per_step_ms = 1e-3 / steps  # the profiler's times are microseconds
    categories: dict[str, float] = {}
    kernels: dict[str, float] = {}  # by name as recorded (120 characters)
    for name, micros, _ in timed:
        category = categorise(name)
        categories[category] = categories.get(category, 0.0) + micros * per_step_ms
        kernels[name[:120]] = kernels.get(name[:120], 0.0) + micros * per_step_ms
    busy_ms = sum(micros for _, micros, _ in timed) * per_step_ms
    wall_ms = 1e3 * wall_seconds / steps
    busiest = sorted(timed, key=lambda item: -item[1])[:top]
    return {
        "counted": "kernels" if on_cuda else "operators", "steps": steps, "wall_ms": wall_ms, "busy_ms": busy_ms, "busy_percent": 100.0 * busy_ms / wall_ms,
        "launches_per_step": sum(count for _, _, count in timed) / steps,
        "categories": dict(sorted(categories.items(), key=lambda item: -item[1])),
        "top": [{"name": name[:120], "ms": micros * per_step_ms, "calls": count / steps, "category": categorise(name)}
                for name, micros, count in busiest],
        "kernels": dict(sorted(kernels.items(), key=lambda item: -item[1])),  # every one, ms per step
    }


def difference(summary: dict, reference: dict, top: int = 10) -> dict:
    """Per-step device time of `summary` minus `reference`'s: in all, by category, and the kernels that
    account for most of it (either way), largest first."""
    def minus(ours: dict, theirs: dict) -> dict:
        return {key: ours.get(key, 0.0) - theirs.get(key, 0.0) for key in ours.keys() | theirs.keys()}

    kernels = minus(summary["kernels"], reference["kernels"])
    return {"busy_ms": summary["busy_ms"] - reference["busy_ms"],
            "categories": dict(sorted(minus(summary["categories"], reference["categories"]).items(),
                                      key=lambda item: -abs(item[1]))),
            "kernels": dict(sorted(kernels.items(), key=lambda item: -abs(item[1]))[:top])}


def format_difference(name: str, reference_name: str, diff: dict) -> str:
    lines = [f"{name} vs {reference_name}: device busy {diff['busy_ms']:+.1f} ms per profiled step"]
    lines += [f"  {category:<24} {ms:+8.2f} ms" for category, ms in diff["categories"].items() if abs(ms) >= 0.005]
    lines += [f"    {ms:+8.2f} ms  [{categorise(kernel)}] {kernel[:90]}" for kernel, ms in diff["kernels"].items()]
    return "\n".join(lines)


def format_profile(name: str, summary: dict) -> str:
    where = "device" if summary["counted"] == "kernels" else "CPU operators"
    lines = [f"{name}: {summary['wall_ms']:.1f} ms per profiled step, {where} busy {summary['busy_ms']:.1f} ms"
             f" ({summary['busy_percent']:.0f}%), {summary['launches_per_step']:,.0f} {summary['counted']} per step"]
    lines += [f"  {category:<24} {ms:8.2f} ms {100 * ms / summary['busy_ms']:5.1f}%"
              for category, ms in summary["categories"].items()]
    lines += [f"    {row['ms']:8.2f} ms {row['calls']:6.0f} calls  [{row['category']}] {row['name'][:90]}"
              for row in summary["top"]]
    return "\n".join(lines)
