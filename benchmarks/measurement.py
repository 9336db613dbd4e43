"""What the layer and GEMM benchmarks share: timing a forward + backward, recording each measurement
(or why it failed) as a JSON row as soon as it is taken, and printing the rows as a table."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def json_output(text: str) -> Path:
    """argparse type of --json: a file in an existing directory, checked before anything is measured."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {path.parent} does not exist")
    if path.is_dir():  # written after the first measurement: a traceback then would lose the run
        raise argparse.ArgumentTypeError(f"{path} is a directory; give a file name, e.g. {path / 'rows.json'}")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{path} cannot be written")
    return path


def count_at_least(minimum: int):
    """argparse type of a count of at least `minimum`: 0 repeats or steps were a failure per row or model, a
    negative warm-up or profile a division by it."""
    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value
    return count


positive_int, non_negative_int = count_at_least(1), count_at_least(0)


def add_measurement_arguments(parser: argparse.ArgumentParser, repeats: int = 5, warmup: int = 2) -> None:
    """--dtype, --repeats, --warmup and --json, as every kernel and layer benchmark takes them."""
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA")
    parser.add_argument("--repeats", type=positive_int, default=repeats)
    parser.add_argument("--warmup", type=non_negative_int, default=warmup)
    parser.add_argument("--json", type=json_output, help="write the rows here")


# a training-step benchmark measures steps: no TensorBoard, checkpoints, resumes or validation
QUIET = ["logging.tensorboard=false", "checkpoint.save_interval=0", "checkpoint.resume=false", "train.eval_interval=0"]


def checked_overrides(parser: argparse.ArgumentParser, runs: list[tuple[Path, list[str]]], world_size: int = 1) -> None:
    """Load each (config, overrides) before any model is built or process started: when none loads (a
    --set typo) that is one argparse error, not a traceback per model or rank; when only some do, the
    others are measured and the failing ones recorded as failed rows."""
    from megatron_unipool.config import ConfigError, load_config

    errors = []
    for path, overrides in runs:
        try:
            load_config(path, overrides, world_size=world_size)
        except ConfigError as e:
            errors.append(f"{path.name}: {e}")
    if len(errors) == len(runs):
        parser.error(errors[0])


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: fp32, bf16, or auto (bf16 on CUDA, fp32 elsewhere)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def median_seconds(run, repeats: int, warmup: int, device: torch.device, setup=None) -> float:
    """Median seconds of `run()` (the device drained before and after each; `setup()`, untimed, before)."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_forward_backward(forward, params, x, repeats: int, warmup: int, autocast_to: torch.dtype | None = None
                          ) -> float:
    """Median seconds of one forward + backward (the forward under autocast when `autocast_to` is given).
    The backward starts from a gradient of the output made once, in the first (warm-up) run: a loss
    computed from the output would add its own passes over it (a fp32 copy, square, mean and their
    backward: about half the time of an elementwise kernel's row) to every measurement."""
    output_gradient = []

    def clear_gradients():
        for p in params:
            p.grad = None
        x.grad = None

    def forward_backward():
        with torch.autocast(x.device.type, dtype=autocast_to, enabled=autocast_to is not None):
            out = forward(x)
        if not output_gradient:
            output_gradient.append(torch.randn_like(out))
        out.backward(output_gradient[0])

    return median_seconds(forward_backward, repeats, max(warmup, 1), x.device, setup=clear_gradients)


def error_text(error: Exception) -> str:
    """A failed measurement's error in a row: its type and first line (a bare `assert` has none)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def measure_row(rows: list[dict], row: dict, label: str, measure, derive, json_path: Path | None) -> None:
    """Fill `row` with `derive(seconds)` of `measure()`, or with `error` when it raised (out of memory,
    a shape a kernel refuses, DeepSpeed refusing a config: the other measurements go on); append it
    and rewrite the JSON, so that a run stopped at its time limit keeps what it measured."""
    try:
        seconds = measure()
    except Exception as error:
        row["error"] = error_text(error)
        print(f"  failed   {label}: {row['error']}", file=sys.stderr, flush=True)
    else:
        row.update(derive(seconds))
        print(f"  measured {label}: {1e3 * seconds:8.2f} ms", file=sys.stderr, flush=True)
    rows.append(row)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))


def add_ratios(rows: list[dict], reference: str, size: str, value: str, ratio: str,
               references: list[dict] | None = None) -> None:
    """row[ratio] = row[value] / the same shape's `reference` impl's (None where that one failed or
    was not measured), the reference found among `references` (default: `rows`); `size` names the rows'
    size column (shape = experts, top-k where rows have one, and size)."""
    for row in rows:
        if "error" in row:
            continue
        twin = next((r for r in (references or rows) if r["impl"] == reference and r[size] == row[size]
                     and r["experts"] == row["experts"] and r.get("top_k") == row.get("top_k")
                     and "error" not in r), None)
        row[ratio] = row[value] / twin[value] if twin else None


def print_table(rows: list[dict], columns: list[tuple[str, str, int, str]], naming: int = 3) -> None:
    """One line per row; `columns`: (header, row key, width, template such as "{:.2f}x"). The first
    `naming` columns name the shape and impl, so a failed row prints those and its error; a missing
    value prints '-'."""
    print(" ".join(f"{header:>{width}}" for header, _, width, _ in columns))
    for row in rows:
        shape = " ".join(f"{row[key]:>{width}}" for _, key, width, _ in columns[:naming])
        if "error" in row:
            print(f"{shape}  failed: {row['error']}")
            continue
        measured = columns[naming:]
        values = [template.format(row[key]) if row.get(key) is not None else "-" for _, key, _, template in measured]
        print(shape, " ".join(f"{value:>{width}}" for value, (_, _, width, _) in zip(values, measured)))
