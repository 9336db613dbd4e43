"""Small-scale reproduction of the UniPool comparison on the built-in corpus, on CPU.

    python tools/reproduce.py [--seeds 1 2 3] [--output runs/reproduce] [--set train.max_steps=300]

Trains, at equal active parameters and tokens (the tiny configs), for each seed:
  dense, vanilla MoE, UniPool with the full pool, UniPool with 67% and 50% pools, and the ablation
  "shared pool with per-layer aux loss and softmax routing" (against pool aux loss + NormRouter).
Every run is `launch/pretrain.py` in its own process and directory (log.txt, and overrides.json:
the --set overrides it was trained with); finished runs (summary.json present) are skipped, so an
interrupted reproduction continues where it stopped, and a run directory trained with other
overrides is refused, not reused. Writes results.json, results.md (validation loss mean +- std over
seeds, and whether the paper's ordering held) and curves.png (training loss, mean over seeds) into
--output, each replaced whole.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_unipool  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from megatron_unipool.config import ConfigError, load_config, parse_override  # noqa: E402
from megatron_unipool.training import checkpoints_dir  # noqa: E402
from megatron_unipool.training.outputs import check_output_directory, save_atomically  # noqa: E402

LOG_TAIL = 20  # lines of a failed run's log shown
MODELS = {  # name: its config and the overrides that make it
    "dense": ("configs/tiny_dense_cpu.json", []),
    "vanilla": ("configs/tiny_vanilla_cpu.json", []),
    "unipool": ("configs/tiny_unipool_cpu.json", []),
    "unipool-67%": ("configs/tiny_unipool_cpu.json", []),
    "unipool-50%": ("configs/tiny_unipool_cpu.json", []),
    "shared-pool-layer-aux-softmax": ("configs/tiny_unipool_cpu.json", ["moe.aux_loss=layer", "moe.router=softmax"]),
}
REDUCED_POOLS = {"unipool-67%": 0.67, "unipool-50%": 0.5}  # of the full pool (tiny configs: 4 MoE layers x 8 experts)


def launch_overrides(seed: int) -> list[str]:
    return [f"train.seed={seed}", "checkpoint.save_interval=0"]


def model_overrides(name: str, overrides: list[str]) -> list[str]:
    """What makes `name` from its config; a reduced pool's size is its share of the full pool that the config
    has with the user's --set (a --set of the layers or experts per layer resizes the reduced pools with it)."""
    config, own = MODELS[name]
    if name not in REDUCED_POOLS:
        return own
    full = load_config(REPO / config, own + overrides, world_size=None)
    experts = full.moe.experts_per_pool(full.model.num_layers)
    return own + [f"moe.pool_size={round(REDUCED_POOLS[name] * experts)}"]


def reserved_keys(models: list[str]) -> set[str]:
    """The keys the tool sets per run (the seed) or that tell a model from its variants (a UniPool's pool size,
    router and aux loss, whichever of them is asked for): a --set of one would make the seeds one run, or a
    model something other than its label. (Checkpoints, off by default, are the user's to turn on.)"""
    files = {MODELS[name][0] for name in models}
    variants = [o for config, variant in MODELS.values() if config in files for o in variant]
    reduced = any(MODELS[name][0] in files for name in REDUCED_POOLS)
    return ({"train.seed", "moe.kind"} | ({"moe.pool_size"} if reduced else set())
            | {f"{section}.{key}" for section, key, _ in map(parse_override, variants)})


def check_settings(models: list[str], seeds: list[int], overrides: list[str]) -> None:
    """Every run's config, validated before anything trains: a --set that only some models refuse must not
    end the reproduction after the others' runs."""
    try:
        given = {f"{section}.{key}" for section, key, _ in map(parse_override, overrides)}
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    if reserved := sorted(given & reserved_keys(models)):
        raise SystemExit(f"error: --set {', '.join(reserved)}: reproduce.py sets these per run or per model"
                         f" (seeds: --seeds; models: --models)")
    for seed in seeds:
        for name in models:
            try:
                load_config(REPO / MODELS[name][0], launch_overrides(seed) + model_overrides(name, overrides) + overrides)
            except ConfigError as e:
                raise SystemExit(f"error: {name} seed {seed}: {e}")


def run_dir_of(name: str, seed: int, output: Path) -> Path:
    return output / name / f"seed{seed}"


def same_settings(overrides: list[str], others: list[str]) -> bool:
    """Whether two --set lists give the same fields the same values, whatever their order or spelling
    (the last value given for a field counts)."""
    def settings(texts: list[str]) -> dict:
        return {(section, key): value for section, key, value in map(parse_override, texts)}

    try:
        return settings(overrides) == settings(others)
    except ConfigError:  # an override the launch will refuse: only the same text is the same
        return overrides == others


def refuse_stale(name: str, seed: int, output: Path, overrides: list[str]) -> None:
    """A run directory that would be reused (summary.json) or resumed (a checkpoint) must have been
    trained with the same overrides: results of another setting must not enter the table."""
    run_dir = run_dir_of(name, seed, output)
    recorded, wanted = run_dir / "overrides.json", model_overrides(name, overrides) + overrides
    if not ((run_dir / "summary.json").is_file() or checkpoints_dir(run_dir).exists()):
        return
    if not recorded.is_file():
        raise SystemExit(f"error: {run_dir} holds a run with no overrides.json (an older reproduce.py), so its --set"
                         f" overrides are unknown; delete it, use another --output, or if it was trained with"
                         f" {wanted} write that list to {recorded}")
    try:
        previous = json.loads(recorded.read_text())
        if not (isinstance(previous, list) and all(isinstance(o, str) for o in previous)):
            raise ValueError("not a list of strings")
    except ValueError as e:  # JSONDecodeError included: the file is written by hand (see above)
        raise SystemExit(f"error: {recorded} is not a JSON list of section.key=value strings ({e}); fix or delete it")
    if not same_settings(previous, wanted):
        raise SystemExit(f"error: {run_dir} was trained with the overrides {previous},"
                         f" not {wanted}; delete it or use another --output")


def run(name: str, seed: int, output: Path, overrides: list[str]) -> dict:
    """Train (or reuse) one run; main has refused stale run directories before anything trained."""
    run_dir = run_dir_of(name, seed, output)
    summary, recorded, log_path = run_dir / "summary.json", run_dir / "overrides.json", run_dir / "log.txt"
    wanted = model_overrides(name, overrides) + overrides
    if not summary.is_file():
        command = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(REPO / MODELS[name][0]),
                   "--run-dir", str(run_dir)]
        command += [item for o in launch_overrides(seed) + wanted for item in ("--set", o)]
        run_dir.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps(wanted) + "\n")
        print(f"training {name} seed {seed}: log in {log_path}", flush=True)
        with open(log_path, "a") as log:  # a resumed run keeps the log of its first part
            failed, stopped_by = train_in_child(command, log)
        if stopped_by:
            print(f"reproduce: interrupted ({signal.Signals(stopped_by).name}) during {name} seed {seed}; run the same"
                  f" command again to continue (a SIGTERM-stopped run resumes from its checkpoint)", file=sys.stderr)
            raise SystemExit(128 + stopped_by)  # as a shell reports the signal: 130 or 143
        if failed:
            tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL:]
            raise SystemExit(f"error: {name} seed {seed} failed (exit status {failed}); the end of {log_path}:\n"
                             + "\n".join(f"  {line}" for line in tail))
    try:
        return json.loads(summary.read_text())
    except ValueError as e:  # written whole by the run, but a file a person edited or a disk filled may not be
        raise SystemExit(f"error: {summary} is damaged ({e}); delete it and rerun: {name} seed {seed} resumes from"
                         f" its last checkpoint")


# what a signal to us becomes for the run: a hangup (the terminal or ssh gone) stops it as SIGTERM does, saving
FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGHUP: signal.SIGTERM}


def train_in_child(command: list[str], log) -> tuple[int, int]:
    """(exit status, the signal that stopped us or 0): SIGTERM, SIGINT and SIGHUP are passed on to the launch
    and waited for (it saves its step on SIGTERM), so no trainer is left running without us in the run directory.
    The child has its own session, so a terminal's Ctrl-C reaches it once, through us. A signal we ignore
    (nohup's SIGHUP) stays ignored, by the child too."""
    seen, started, previous = [], [], {}

    def forward(signum, frame):
        seen.append(signum)
        for child in started:  # none while it starts: passed on below
            child.send_signal(FORWARDED[signum])

    try:  # the handlers before the child: a signal while it starts must not leave it running without us
        for signum in FORWARDED:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, forward)
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(child)
        if seen:  # came while it started (or just now, passed on already: a second signal is only noted by it)
            child.send_signal(FORWARDED[seen[0]])
        status = child.wait()  # retried after each forwarded signal (PEP 475)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status, (seen[0] if seen else 0)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(results: dict[str, list[dict]]) -> str:
    val = {name: mean_std([s["final_val_loss"] for s in runs]) for name, runs in results.items()}
    lines = ["| model | params | active | validation loss (mean +- std) | seeds |", "|---|---:|---:|---:|---:|"]
    for name, runs in results.items():
        lines.append(f"| {name} | {runs[0]['total_params'] / 1e6:.2f}M | {runs[0]['active_params'] / 1e6:.2f}M | "
                     f"{val[name][0]:.4f} +- {val[name][1]:.4f} | {len(runs)} |")
    checks = []
    seeds = {name: len(runs) for name, runs in results.items()}

    def compare(better: str, worse: str):
        if better in val and worse in val:
            gap = val[worse][0] - val[better][0]
            noise = max(val[better][1], val[worse][1])
            if min(seeds[better], seeds[worse]) < 2:  # no spread to judge the gap against
                verdict = "held (one seed: no spread to judge it)" if gap > 0 else "did not hold (one seed)"
            else:
                verdict = "held" if gap > noise else ("held, within the seed spread" if gap > 0 else "did not hold")
            checks.append(f"- {better} below {worse}: {verdict} ({val[better][0]:.4f} vs {val[worse][0]:.4f}, "
                          f"largest std {noise:.4f})")

    for better, worse in [("vanilla", "dense"), ("unipool", "vanilla"), ("unipool-67%", "vanilla"),
                          ("unipool-50%", "vanilla"), ("unipool", "shared-pool-layer-aux-softmax")]:
        compare(better, worse)
    if not checks:
        return "\n".join(lines) + "\n"  # no pair of the paper's ordering among these models
    return "\n".join(lines + ["", "The paper's ordering at this scale:"] + checks) + "\n"


def plot(results: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        losses = np.mean([np.asarray(r["train_losses"], dtype=float) for r in runs], axis=0)  # null: a skipped step
        window = max(1, len(losses) // 30)
        # the mean of the window's finite losses: a skipped step is a gap only where the window holds nothing else
        finite = np.isfinite(losses)
        with np.errstate(invalid="ignore", divide="ignore"):
            smooth = (np.convolve(np.where(finite, losses, 0.0), np.ones(window), mode="valid")
                      / np.convolve(finite, np.ones(window), mode="valid"))
        ax.plot(np.arange(len(smooth)) + window, smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training LM loss (mean over seeds)")
    bottom, top = ax.get_ylim()
    if bottom < 4.0 < top:  # zoom past the first steps' losses, never above every curve (an empty, inverted axis)
        ax.set_ylim(top=4.0)
    ax.legend(fontsize="small")
    ax.set_title("tiny models on the Shakespeare corpus")
    fig.tight_layout()
    save_atomically(path, lambda temporary: fig.savefig(temporary, dpi=120, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--output", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="applied to every run, e.g. train.max_steps=300")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):  # one run counted twice would shrink the spread the table reports
        parser.error(f"--seeds must differ from each other, got {args.seeds}")
    if len(set(args.models)) != len(args.models):  # the same: each run of a repeated model would count twice
        parser.error(f"--models must differ from each other, got {args.models}")
    args.output = args.output.resolve()  # absolute: named in the launch commands and in results.json
    try:
        check_output_directory(args.output, f"--output {args.output}")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    check_settings(args.models, args.seeds, args.overrides)  # before training anything (or making --output)
    for seed in args.seeds:
        for name in args.models:
            refuse_stale(name, seed, args.output, args.overrides)
    args.output.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    total, done, started = len(args.models) * len(args.seeds), 0, time.perf_counter()
    for seed in args.seeds:  # seed-major: an interrupted reproduction has whole seeds of every model
        for name in args.models:
            results.setdefault(name, []).append(run(name, seed, args.output, args.overrides))
            done += 1
            elapsed = time.perf_counter() - started
            print(f"[{done}/{total}] {name} seed {seed}: validation loss {results[name][-1]['final_val_loss']:.4f}"
                  f" ({elapsed / 60:.1f} min elapsed)", flush=True)
    text = report(results)
    save_atomically(args.output / "results.md", lambda temporary: temporary.write_text(text))
    table = json.dumps({name: [{"seed": seed, **{k: s[k] for k in ("final_val_loss", "final_train_loss", "total_params",
                                                                  "active_params", "tokens_per_second", "train_losses")}}
                               for seed, s in zip(args.seeds, runs)]
                        for name, runs in results.items()}, indent=2)
    save_atomically(args.output / "results.json", lambda temporary: temporary.write_text(table))
    plot(results, args.output / "curves.png")
    print(text)
    print(f"wrote {args.output / 'results.md'}, results.json and curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
