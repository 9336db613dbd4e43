"""Sample text from a trained run: continue a prompt, to read what the model has learned.

    python tools/generate.py --checkpoint runs/tiny_unipool_cpu [--prompt "ROMEO:"] [--max-new-tokens 200]
                             [--num-samples 3] [--temperature 0.8] [--top-k 50] [--seed 0] [--json samples.json]

Each sample starts a new document (the prompt follows an end-of-document id, as documents do in training)
and ends at the model's end-of-document id or after --max-new-tokens. --temperature 0 takes the most likely
token each time. The text is decoded by the tokenizer that wrote the run's training data: the built-in byte
and GPT-2 tokenizers are found from the run, as is a tokenizer.json its data.tokenizer names; one that wrote
preprocessed files is passed as --tokenizer. A tokenizer other than the run's is refused, and a run that
records none (an import) needs --tokenizer.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional

try:
    import megatron_unipool  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_unipool.config import Config, ConfigError  # noqa: E402
from megatron_unipool.data import Tokenizer, build_tokenizer  # noqa: E402
from megatron_unipool.model.generation import generate  # noqa: E402
from megatron_unipool.training import CheckpointError, DataError  # noqa: E402
from megatron_unipool.training.checkpoint import load_trained_model  # noqa: E402
from megatron_unipool.training.outputs import check_output_file, write_json_report  # noqa: E402
from megatron_unipool.training.probe import analysis_device, analysis_precision  # noqa: E402

BUILT_IN = ("byte", "gpt2")
PROGRESS_EVERY_S = 5.0


def run_tokenizer(recorded: Optional[str], config: Config, spec: Optional[str], imported_from: Optional[str] = None
                  ) -> Tokenizer:
    """The tokenizer that wrote the run's training data: `spec` (--tokenizer), else the one the run recorded
    when it is built in, else the run's data.tokenizer; refused when it is not the one the run recorded, or
    its vocabulary is larger than the model's. A run that records none (an import, or data files of an older
    format) needs `spec`: its data.tokenizer may be a default that never read its data."""
    if recorded is None and spec is None:
        beside = Path(imported_from or "") / "tokenizer.json"
        where = f" (the imported model's is {beside})" if imported_from and beside.is_file() else ""
        raise DataError("the run does not record the tokenizer its ids belong to (an import, or data files of an"
                        f" older format): pass it as --tokenizer{where}")
    chosen = spec or (recorded if recorded in BUILT_IN else config.data.tokenizer)
    tokenizer = build_tokenizer(chosen)
    if recorded is not None and tokenizer.name != recorded:
        hint = "pass the run's tokenizer.json as --tokenizer" if recorded.startswith("hf-") else f"use --tokenizer {recorded}"
        named = tokenizer.name if chosen == tokenizer.name else f"{chosen} ({tokenizer.name})"
        raise DataError(f"the run's training data was written by tokenizer {recorded}, not {named}: its ids would"
                        f" decode to other text; {hint}")
    if tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(f"tokenizer {chosen} has {tokenizer.vocab_size} tokens, more than the model's"
                        f" model.vocab_size={config.model.vocab_size}: not the run's tokenizer")
    return tokenizer


def continuation_text(tokenizer: Tokenizer, prompt: list[int], ids: list[int]) -> str:
    """The text `ids` add after `prompt`: decoded together, as a decoder that strips a text's leading space
    (SentencePiece's Metaspace) would drop the space between them if `ids` were decoded alone."""
    head, whole = tokenizer.decode(prompt), tokenizer.decode(prompt + ids)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(ids)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each option's range, before the minutes a large checkpoint takes to load."""
    for name in ("max_new_tokens", "num_samples", "top_k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        parser.error(f"--temperature must be a finite number >= 0, not {args.temperature}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, not {args.seed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="run directory or step_* directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: none, a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=1, help="continuations, generated together")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: the most likely token each time")
    parser.add_argument("--top-k", type=int, default=None, help="draw from the k most likely tokens only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None,
                        help="byte, gpt2 or a tokenizer.json (default: the run's; a tokenizer.json run needs it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where there is one)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the forward passes under bf16 autocast, as training computes them")
    parser.add_argument("--json", type=Path, default=None, help="also write the samples and settings here")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    try:
        device = analysis_device(args.device)
        if args.json is not None:
            check_output_file(args.json, f"--json {args.json}")
        print(f"loading {args.checkpoint} ...", flush=True)
        path, payload, config, model = load_trained_model(args.checkpoint)
        tokenizer = run_tokenizer(payload["train_state"].get("tokenizer"), config, args.tokenizer,
                                  payload.get("imported_from"))
    except (CheckpointError, ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = [tokenizer.eod_id] + tokenizer.encode(args.prompt)
    started = time.monotonic()
    last_report = [started]

    def progress(done: int) -> None:
        now = time.monotonic()
        if now - last_report[0] >= PROGRESS_EVERY_S:
            last_report[0] = now
            print(f"  {done}/{args.max_new_tokens} tokens ({done / (now - started):.1f} a second)", flush=True)

    print(f"sampling {args.num_samples} x up to {args.max_new_tokens} tokens from {path} ({device}, {args.precision},"
          f" temperature {args.temperature:g}, top-k {args.top_k or 'all'}, seed {args.seed}) ...", flush=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with analysis_precision(device, args.precision):
        samples = generate(model.to(device), prompt, args.max_new_tokens, config.model.seq_len,
                           num_samples=args.num_samples, temperature=args.temperature, top_k=args.top_k,
                           vocab_size=tokenizer.vocab_size, stop_id=tokenizer.eod_id, eod_id=tokenizer.eod_id,
                           generator=generator, progress=progress)
    rows = [{"text": args.prompt + continuation_text(tokenizer, prompt[1:], ids), "ids": ids,
             "ended": "max_new_tokens" if len(ids) == args.max_new_tokens else "end of document"} for ids in samples]
    for number, row in enumerate(rows, 1):
        print(f"----- sample {number} ({len(row['ids'])} tokens, ended at {row['ended']}) -----")
        print(row["text"])
    if args.json is not None:
        settings = {key: getattr(args, key) for key in ("prompt", "max_new_tokens", "temperature", "top_k", "seed",
                                                          "precision")}
        write_json_report(args.json, {"checkpoint": str(path), "tokenizer": tokenizer.name, **settings, "samples": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
