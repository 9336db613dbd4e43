"""What a run reports: a Megatron-style console line per log interval (with ETA), TensorBoard
scalars, histograms and the pool heatmap, and `summary.json` at the end."""
from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path, PurePath
from typing import Optional

import numpy as np
import torch

from ..config import ConfigError, LoggingConfig
from .hardware import GpuMonitor
from .outputs import save_atomically
from .plots import utilisation_figure


def _finite_or_null(value):
    """NaN and infinities (a skipped step's loss) as null: they are not JSON, and jq or JavaScript refuse the file."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


COUNTERS = ("skipped_steps",)  # metrics that are running totals
LATEST = ("lr",)  # the value at the logged step, as Megatron prints it
RATES = ("tokens_per_second", "tflops_per_device", "mfu_percent")  # per-step work / step time


def distinct_names(paths: list[str]) -> dict[str, str]:
    """Each path's shortest ending of whole components that no other path ends in (code/valid and web/valid for
    /data/code/valid and /data/web/valid): names of files short enough for a console line and TensorBoard's tags."""
    parts = {path: PurePath(path).relative_to(PurePath(path).anchor).parts for path in paths}
    names = {}
    for path, own in parts.items():
        for n in range(1, len(own) + 1):
            if all(other[-n:] != own[-n:] for elsewhere, other in parts.items() if elsewhere != path):
                break
        names[path] = PurePath(*own[-n:]).as_posix()
    return names


def _scalar(value) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def check_tensorboard(config: LoggingConfig) -> None:
    """A ConfigError when the run starts, on every rank, rather than a traceback on the logging rank once
    the model is built, when logging.tensorboard asks for a writer that cannot be imported."""
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"logging.tensorboard=true needs the tensorboard package ({e}): pip install"
                              " tensorboard, or set logging.tensorboard=false") from e


class MetricsLogger:
    def __init__(self, run_dir: Path, config: LoggingConfig, max_steps: int, enabled: bool = True,
                 resumed_step: int = 0, device: Optional[torch.device] = None):
        self.config, self.max_steps, self.enabled = config, max_steps, enabled
        self.run_dir = run_dir
        self.writer = None
        if enabled and config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A run resumed at step T (0 too: killed before its first checkpoint) may have logged steps
            # past T before it stopped; purge_step makes TensorBoard drop those, so each step shows
            # once, with the resumed run's values.
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_step + 1)
        self.gpu = GpuMonitor(device) if enabled else None  # only the logging rank reads NVML
        self.window: list[dict[str, float]] = []
        self.started = time.perf_counter()
        self.first_step: Optional[int] = None

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Record one optimizer step (1-based `step`); print the mean of the window every log interval."""
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step, self.started = step - 1, time.perf_counter() - metrics.get("step_time_s", 0.0)
        metrics = {k: _scalar(v) for k, v in metrics.items()}
        metrics.update(self.gpu.read())
        if self.writer:
            for name, value in metrics.items():
                self.writer.add_scalar(f"train/{name}" if "/" not in name else name, value, step)
        self.window.append(metrics)
        if step % self.config.log_interval == 0 or step == self.max_steps:
            self._print(step)

    def _print(self, step: int) -> None:
        # a skipped step's non-finite loss or norm is counted in skipped_steps, not averaged into the others
        mean = {k: _finite_mean([m[k] for m in self.window if k in m]) for k in self.window[-1]}
        mean.update({k: self.window[-1][k] for k in COUNTERS + LATEST if k in mean})  # the latest, not a mean
        # a window's rate is its total work over its total time: the step rates weighted by step time
        # (their plain mean overstates it whenever step times vary)
        seconds = [m.get("step_time_s", 0.0) for m in self.window]
        if all(t > 0 for t in seconds):
            mean.update({k: sum(m[k] * t for m, t in zip(self.window, seconds)) / sum(seconds)
                         for k in RATES if all(k in m for m in self.window)})
        # fewer steps than an interval (after a resume, or at the end): its means differ from an unbroken run's line
        window = len(self.window)
        self.window.clear()
        elapsed = time.perf_counter() - self.started
        done = step - self.first_step
        eta = datetime.timedelta(seconds=round(elapsed / max(done, 1) * (self.max_steps - step)))
        parts = [f"step {step:>{len(str(self.max_steps))}}/{self.max_steps}"
                 + (f" (window of {window} step{'s' if window > 1 else ''})" if window < self.config.log_interval else "")]
        formats = [("lr", "lr", "{:.3e}"), ("lm_loss", "lm loss", "{:.4f}"), ("aux_loss", "aux loss", "{:.3e}"),
                   ("z_loss", "z loss", "{:.3e}"), ("entropy_loss", "entropy loss", "{:.3e}"), ("grad_norm", "grad norm", "{:.3f}"),
                   ("step_time_s", "ms/step", None), ("tokens_per_second", "tokens/s", "{:,.0f}"),
                   ("tflops_per_device", "TFLOP/s/device", "{:.3f}"), ("mfu_percent", "MFU %", "{:.1f}"),
                   ("dropped_fraction", "dropped", "{:.2%}"), ("unrouted_fraction", "unrouted", "{:.2%}"),
                   ("skipped_steps", "skipped steps", "{:.0f}")]
        for key, label, fmt in formats:
            if key in mean and (mean[key] or key not in COUNTERS):  # a counter shows once it is non-zero
                text = f"{mean[key] * 1000:.1f}" if fmt is None else fmt.format(mean[key])
                parts.append(f"{label} {text}")
        parts.append(f"ETA {eta}")
        print(" | ".join(parts), flush=True)

    def evaluation(self, step: int, loss: float, by_file: Optional[dict[str, float]] = None) -> None:
        """The validation loss and perplexity; `by_file` (data.valid_per_file) adds each file's, under the file's
        distinct_names in TensorBoard (validation/<name>/loss)."""
        if not self.enabled:
            return
        named = {name: by_file[path] for path, name in distinct_names(list(by_file or {})).items()}
        parts = [f"validation at step {step} | loss {loss:.4f} | perplexity {math.exp(min(loss, 50.0)):.3f}"]
        parts += [f"{name}: loss {value:.4f}, perplexity {math.exp(min(value, 50.0)):.3f}" for name, value in named.items()]
        print(" | ".join(parts), flush=True)
        if self.writer:
            for tag, value in [("validation/", loss), *((f"validation/{name}/", value) for name, value in named.items())]:
                self.writer.add_scalar(f"{tag}loss", value, step)
                self.writer.add_scalar(f"{tag}perplexity", math.exp(min(value, 50.0)), step)

    def utilisation(self, step: int, counts_per_pool: list[torch.Tensor], layers_per_pool: list[list[int]],
                    image: bool) -> None:
        """Per-expert load over all layers as a histogram every step; the heatmap (rows named by the
        model layers of each pool) when `image`."""
        if not (self.enabled and self.writer and counts_per_pool):
            return
        for p, counts in enumerate(counts_per_pool):
            load = counts.sum(dim=0).float()
            if not load.sum() > 0:  # nothing routed (every token unrouted, a skipped step): no balance to show,
                continue  # where a peak-over-mean of 0 would read as perfect balance
            self.writer.add_histogram(f"pool{p}/expert_load", load / load.sum(), step)
            self.writer.add_scalar(f"pool{p}/max_over_mean_load", (load.max() / load.mean()).item(), step)
        if image:
            figure = utilisation_figure([c.cpu().numpy() for c in counts_per_pool], f"pool utilisation, step {step}",
                                        layers_per_pool)
            self.writer.add_figure("pool/utilisation", figure, step)

    def close(self, summary: Optional[dict] = None) -> None:
        """Flush and close TensorBoard's events; write summary.json for a finished run."""
        if not self.enabled:
            return
        if summary is not None:
            text = json.dumps(_finite_or_null(summary), indent=2, allow_nan=False)
            # whole or not at all: a run killed while writing it must not leave reproduce.py a part to read
            save_atomically(self.run_dir / "summary.json", lambda temporary: temporary.write_text(text))
        if self.writer:
            self.writer.close()
