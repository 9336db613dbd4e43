"""Where a training step's time goes: torch.profiler over a few steps, summarised as device time per
kernel category, the busiest kernels, how many kernels a step launches, and how much of the wall
time the device was busy (well under 100% means the step waits on the host: Python, launches, syncs);
and, between two models' profiles, where one's extra device time goes (by category and by kernel).

On CUDA the summary counts GPU kernels and copies; on CPU it counts operators' self CPU time. On CUDA it
also says why the device was idle (`timeline`): every gap between kernels, charged to the host operator
that launched the kernel ending it (the host was still busy, or waiting, when the device ran dry), and
every time the host waited for the device (a synchronising runtime call: `.item()`, `.tolist()`, a copy
to pageable memory), charged to the operator it ran under. The profiler slows the host, so gaps are
longer than in an unprofiled step: read them for where the host falls behind, not for how much.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

# first match wins: names are lower-cased kernel names (CUDA) or aten operators (CPU)
CATEGORIES = (
    ("optimizer", ("adam", "multi_tensor_apply")),
    ("attention", ("flash", "fmha", "attention", "scaled_dot_product")),
    # our Triton kernels by name: the pool's weight gradients, the MoE permute / combine, RoPE and SwiGLU
    ("grouped gemm", ("grouped_mm", "groupproblemshape", "grouped", "segmented_at_b")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")),
    # not "aten::to", which aten::topk contains (aten::to's copies are aten::_to_copy and aten::copy_)
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "aten::zero")),
    ("sort / scan / index", ("sort", "scan", "index", "scatter", "gather", "histogram", "bincount", "cumsum",
                             "topk", "radix", "_sum_rows_kernel", "_combine_backward_kernel")),
    ("cross entropy / softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("reduction", ("reduce", "norm", "sum", "mean", "amax")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "aten::mul", "aten::add", "aten::silu", "aten::div",
                     "_rotary_kernel", "_swiglu_")),
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
    summary = summarise(prof.key_averages(), steps, wall, on_cuda, top)
    if on_cuda:
        spans, waits = device_timeline(prof)
        summary["timeline"] = {"idle": idle_gaps(spans, steps, top), "host_waits": host_waits(waits, steps, top)}
    return summary


class _OperatorCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_host_operators(step) -> Counter:
    """The aten operators `step()` dispatches (forward, autograd's backward, optimizer, bookkeeping), by name,
    counted below autograd as they reach the kernels: each costs the host a dispatch and, on a GPU, launches
    a kernel or more (views launch none). Where the device waits on the host, a step's time follows their
    number; unlike a time, the count is exact and the same on any machine for the same code path."""
    with _OperatorCounter() as counter:
        step()
    return counter.counts


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


# runtime calls in which the host blocks until the device has caught up (besides every *Synchronize)
BLOCKING_COPIES = ("cudaMemcpy", "cudaMemcpy2D")
GAP_SIZES_US = ((10.0, "< 10 us"), (100.0, "10-100 us"), (1000.0, "0.1-1 ms"), (float("inf"), ">= 1 ms"))


@dataclass(frozen=True)
class DeviceSpan:
    """One kernel, copy or fill on the device, and the host operator that launched it."""

    start_us: float
    end_us: float
    launched_by: str


def operator_path(event) -> str:
    """`outermost > operator` for a host operator (FunctionEvent): e.g. the autograd node around an aten op."""
    outermost = event
    while outermost.cpu_parent is not None:
        outermost = outermost.cpu_parent
    return event.name if outermost is event else f"{outermost.name} > {event.name}"


def device_timeline(prof) -> tuple[list[DeviceSpan], list[tuple[float, str]]]:
    """From a CUDA profile: every device span with its launching operator, and every host wait
    (microseconds, operator). Device events and runtime calls name their host operator by its
    correlation id (kineto's `linked_correlation_id`), which is the id of that operator's FunctionEvent."""
    operators = {event.id: event for event in prof.events()  # not the runtime calls: their ids are CUDA's
                 if event.device_type == DeviceType.CPU and not getattr(event, "linked_correlation_id", 0)
                 and not event.name.startswith("cu")}

    def launcher(kineto_event) -> str:
        host = operators.get(kineto_event.linked_correlation_id())
        return operator_path(host) if host is not None else "(outside any operator)"

    spans, waits = [], []
    for event in prof.profiler.kineto_results.events():
        if event.device_type() == DeviceType.CUDA:
            if event.is_user_annotation():  # a range around kernels (torch's optimizer step), not device work
                continue
            spans.append(DeviceSpan(event.start_ns() / 1e3, event.end_ns() / 1e3, launcher(event)))
        elif "Synchronize" in event.name() or event.name() in BLOCKING_COPIES:  # torch.cuda.synchronize() has no operator
            waits.append((event.duration_ns() / 1e3, f"{launcher(event)} ({event.name()})"))
    return spans, waits


def ranked(items) -> list[tuple[str, float, int]]:
    """(name, summed microseconds, how many) for each name of the (name, microseconds) items, largest first."""
    totals: dict[str, tuple[float, int]] = {}
    for name, micros in items:
        total, count = totals.get(name, (0.0, 0))
        totals[name] = (total + micros, count + 1)
    return sorted(((name, total, count) for name, (total, count) in totals.items()), key=lambda row: -row[1])


def idle_gaps(spans: list[DeviceSpan], steps: int, top: int = 8) -> dict:
    """The device's idle time between its first and last span, per step: in all, by gap size, and by
    the operator that launched the span ending each gap (largest first). Spans may overlap (streams)."""
    gaps = []  # (operator that launched the span ending the gap, microseconds)
    by_size = {label: 0.0 for _, label in GAP_SIZES_US}
    busy_until = None
    for span in sorted(spans, key=lambda s: s.start_us):
        if busy_until is not None and span.start_us > busy_until:
            gap = span.start_us - busy_until
            gaps.append((span.launched_by, gap))
            by_size[next(label for limit, label in GAP_SIZES_US if gap < limit)] += gap
        busy_until = span.end_us if busy_until is None else max(busy_until, span.end_us)
    per_step_ms = 1e-3 / steps
    return {"idle_ms": sum(gap for _, gap in gaps) * per_step_ms, "gaps_per_step": len(gaps) / steps,
            "by_size_ms": {label: micros * per_step_ms for label, micros in by_size.items()},
            "causes": [{"launched_by": name, "ms": total * per_step_ms, "gaps": count / steps}
                       for name, total, count in ranked(gaps)[:top]]}


def host_waits(waits: list[tuple[float, str]], steps: int, top: int = 8) -> dict:
    """The host's waits for the device per step: in all and by operator (largest first)."""
    per_step_ms = 1e-3 / steps
    return {"ms": sum(micros for micros, _ in waits) * per_step_ms, "per_step": len(waits) / steps,
            "operators": [{"operator": name, "ms": total * per_step_ms, "calls": count / steps}
                          for name, total, count in ranked((operator, micros) for micros, operator in waits)[:top]]}


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
    if "timeline" in summary:
        idle, waits = summary["timeline"]["idle"], summary["timeline"]["host_waits"]
        sizes = ", ".join(f"{label} {ms:.1f} ms" for label, ms in idle["by_size_ms"].items())
        lines.append(f"  device idle between kernels {idle['idle_ms']:.1f} ms in {idle['gaps_per_step']:,.0f} gaps"
                     f" ({sizes}); the gaps end with kernels launched by:")
        lines += [f"    {row['ms']:8.2f} ms {row['gaps']:6.0f} gaps  {row['launched_by'][:100]}" for row in idle["causes"]]
        lines.append(f"  host waited for the device {waits['ms']:.1f} ms in {waits['per_step']:,.0f} calls:")
        lines += [f"    {row['ms']:8.2f} ms {row['calls']:6.0f} calls  {row['operator'][:100]}" for row in waits["operators"]]
    return "\n".join(lines)
