"""Peak host memory and time of the data and checkpoint tools, on inputs far larger than the tests use.

    python benchmarks/tool_memory.py [--document-mb 50] [--documents 20000] [--json out.json]
    python benchmarks/tool_memory.py --config configs/unipool_182m.json --set model.num_layers=4 ...

Each tool runs as a process of its own, as a user runs it. A row gives its wall time, its peak resident
memory, its largest encoding worker's, and the peak above the same tool's start on a tiny input: that is
what the input costs, also given as a multiple of the input's largest piece (the long document, or the
checkpoint's weights).

- preprocess: a JSONL file with one long document first, then many small ones, with the byte and GPT-2
  tokenizers and 1 or 2 workers.
- convert --to hf: a checkpoint of --config (by default a 4-layer UniPool of the 182M model's widths
  with a 16-expert pool and a softmax router, which Hugging Face classes compute) exported whole.
- upcycle x2: the same checkpoint's pool doubled (uniform selection).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_unipool  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from measurement import json_output, positive_int  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "unipool_182m.json"
DEFAULT_MODEL = ["model.num_layers=4", "moe.pool_size=16", "moe.router=softmax"]
TINY_MODEL = REPO / "configs" / "tiny_unipool_cpu.json"  # the checkpoint tools' start, for their baseline
MIB = 2**20

# Runs a tool (argv[1:]) as its own __main__ and writes its peak memory and time to $MEASURED_TO at exit.
MEASURED = """
import json, os, resource, runpy, sys, time
started = time.perf_counter()
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    kib = 1024
    with open(os.environ["MEASURED_TO"], "w") as f:
        json.dump({"seconds": time.perf_counter() - started,
                   "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
                   "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib}, f)
"""


def run_measured(tool: str, *arguments: str | Path) -> dict:
    """Seconds, peak MiB and largest worker's peak MiB of tools/TOOL ARGUMENTS; raises with its stderr on failure."""
    with tempfile.NamedTemporaryFile(suffix=".json") as measured:
        done = subprocess.run([sys.executable, "-c", MEASURED, str(REPO / "tools" / tool), *map(str, arguments)],
                              capture_output=True, text=True, env={**os.environ, "MEASURED_TO": measured.name})
        if done.returncode != 0:
            raise RuntimeError(f"{tool} exited {done.returncode}: {done.stderr.strip()[-500:]}")
        return json.loads(Path(measured.name).read_text())


def write_corpus(path: Path, document_mb: float, documents: int) -> int:
    """One document of about ``document_mb`` MB first, then ``documents`` of ~1 kB; the long one's bytes."""
    sentence = "The quick brown fox jumps over the lazy dog; naïve café. "
    long_document = sentence * max(1, round(document_mb * 1e6 / len(sentence.encode("utf-8"))))
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": long_document}) + "\n")
        for i in range(documents):
            f.write(json.dumps({"text": f"document {i}: " + "lorem ipsum dolor sit amet " * 36}) + "\n")
    return len(long_document.encode("utf-8"))


def write_checkpoint(directory: Path, config_path: Path, overrides: list[str]) -> int:
    """A run directory with a freshly initialised model of the config; its weights' bytes."""
    from megatron_unipool.config import load_config
    from megatron_unipool.model import LanguageModel
    from megatron_unipool.training import TrainState
    from megatron_unipool.training.checkpoint import write_run_directory

    config = load_config(config_path, overrides, world_size=None)
    state = LanguageModel(config.model, config.moe).state_dict()
    write_run_directory(directory, config, state, {}, dataclasses.asdict(TrainState()))
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def measure(rows: list[dict], name: str, input_bytes: int, baseline: dict, tool: str, *arguments,
            json_path: Path | None) -> None:
    """Appends a row for one run (its error, when it failed) and rewrites the JSON."""
    row = {"tool": name, "input_mib": input_bytes / MIB}
    try:
        row.update(run_measured(tool, *arguments))
    except RuntimeError as error:
        row["error"] = str(error)
        print(f"  failed   {name}: {error}", file=sys.stderr, flush=True)
    else:
        row["above_start_mib"] = row["peak_mib"] - baseline["peak_mib"]
        row["above_start_per_input"] = row["above_start_mib"] / row["input_mib"]
        print(f"  measured {name}: peak {row['peak_mib']:.0f} MiB in {row['seconds']:.1f} s", file=sys.stderr, flush=True)
    rows.append(row)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--document-mb", type=float, default=50.0, help="the long document's size")
    parser.add_argument("--documents", type=positive_int, default=20_000, help="small documents after it")
    parser.add_argument("--tokenizers", nargs="+", choices=["byte", "gpt2"], default=["byte", "gpt2"])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the checkpoint's model")
    parser.add_argument("--set", dest="overrides", action="append", metavar="SECTION.KEY=VALUE",
                        help=f"change --config (default: {' '.join(DEFAULT_MODEL)})")
    parser.add_argument("--json", type=json_output, help="write the rows here")
    args = parser.parse_args()
    overrides = DEFAULT_MODEL if args.overrides is None else args.overrides
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tool_memory_") as scratch:
        scratch = Path(scratch)
        print(f"writing a corpus with a {args.document_mb:g} MB document and {args.documents} small ones ...",
              file=sys.stderr, flush=True)
        long_document = write_corpus(scratch / "corpus.jsonl", args.document_mb, args.documents)
        (scratch / "tiny.jsonl").write_text('{"text": "tiny"}\n')
        for tokenizer in args.tokenizers:
            common = ["--tokenizer", tokenizer, "--force"]
            baseline = run_measured("preprocess_data.py", "--input", scratch / "tiny.jsonl",
                                    "--output-prefix", scratch / "tiny", *common)
            for workers in (1, 2):
                measure(rows, f"preprocess {tokenizer} x{workers}", long_document, baseline, "preprocess_data.py",
                        "--input", scratch / "corpus.jsonl", "--output-prefix", scratch / "out", *common,
                        "--workers", workers, json_path=args.json)
        print(f"writing a checkpoint of {args.config.name} {' '.join(overrides)} ...", file=sys.stderr, flush=True)
        weights = write_checkpoint(scratch / "run", args.config, overrides)
        write_checkpoint(scratch / "tiny_run", TINY_MODEL, ["moe.router=softmax"])
        tools = [("convert --to hf", "convert_checkpoint.py", ["--to", "hf", "--checkpoint"], ["--output"]),
                 ("upcycle x2", "upcycle.py", ["--multiplier", "2", "--checkpoint"], ["--output"])]
        for name, tool, before, after in tools:
            baseline = run_measured(tool, *before, scratch / "tiny_run", *after, scratch / f"tiny_{tool}")
            measure(rows, name, weights, baseline, tool, *before, scratch / "run", *after, scratch / tool,
                    json_path=args.json)
    print(f"{'tool':>20} {'input MiB':>10} {'seconds':>8} {'peak MiB':>9} {'worker MiB':>10} {'above start':>11}"
          f" {'x input':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['tool']:>20} {row['input_mib']:>10.1f}  failed: {row['error']}")
            continue
        print(f"{row['tool']:>20} {row['input_mib']:>10.1f} {row['seconds']:>8.1f} {row['peak_mib']:>9.0f}"
              f" {row['worker_peak_mib']:>10.0f} {row['above_start_mib']:>11.0f} {row['above_start_per_input']:>8.2f}")


if __name__ == "__main__":
    main()
