"""Upcycle a checkpoint: grow its expert pools m-fold (or turn a dense model into MoE) and write
a run directory that the normal launcher continues from.

    python tools/upcycle.py --checkpoint runs/tiny_unipool_cpu --multiplier 2 --output runs/upcycled
    python tools/upcycle.py --checkpoint RUN --multiplier 2 --selection utility --utility-batches 10 --output OUT
    python tools/upcycle.py --checkpoint runs/tiny_dense_cpu --to-config configs/tiny_vanilla_cpu.json \\
        --set moe.normalize_gates=true --set moe.top_k=2 --output OUT
    python launch/pretrain.py --config OUT/config.json --run-dir OUT      # continued pretraining

--checkpoint takes a run directory (its latest checkpoint) or one step_* directory. The output
holds config.json (the source config with the grown pool) and checkpoints/step_0000000: the
upcycled weights, the optimizer state (reset, or copied to the replicas with --optimizer copy)
and the source's position in the data; the learning-rate schedule starts again at step 0. The
written config continues the run directory (checkpoint.resume) and loads that checkpoint by its
absolute path (checkpoint.load) when launched with another --run-dir. A capacity factor is
multiplied by the multiplier (capacity is per expert: each keeps its slots); --set sets it back.
`--set` changes the written config (e.g. train.max_steps, train.warmup_steps); for a dense source
it applies to --to-config before upcycling, whose expert count then comes from that config alone
(--multiplier, --selection and --optimizer do not apply), and whose train.seed and data section are the dense
run's, where the data position carried is (noted; a --set of them wins). Into vanilla MoE, the copies of a dense FFN
compute it only with gates that sum to 1 and no drops: raw softmax gates (as in configs/*vanilla*.json)
and capacity are refused, hence moe.normalize_gates=true above (with top-2: at top-1 a renormalised
gate is always 1, which leaves the routers to the balancing losses alone). Into UniPool, the pool's
experts copy the layers' FFNs in turn, so a layer's router reaches other layers' FFNs: a warm start,
not the dense model's function, and any router is accepted.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Optional

try:
    import megatron_unipool  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_unipool.config import (Config, ConfigError, DataConfig, load_config, overridden_fields,  # noqa: E402
                                     with_overrides)
from megatron_unipool.training import CheckpointError, DataError, TrainState  # noqa: E402
from megatron_unipool.model import param_budget  # noqa: E402
from megatron_unipool.training.checkpoint import (LATEST, check_fits, check_same_function, checkpoints_dir,  # noqa: E402
                                                  load_trained_state, step_directory_name, trained_model,
                                                  write_run_directory)
from megatron_unipool.training.datasets import seq_len_note  # noqa: E402
from megatron_unipool.training.hardware import check_fits_host_memory  # noqa: E402
from megatron_unipool.training.outputs import (check_output_directory, check_replaceable_output,  # noqa: E402
                                               recover_replaced_directory, write_directory)
from megatron_unipool.training.upcycling import (MAX_EXTRA, Upcycled, expert_utility, upcycle,  # noqa: E402
                                                 upcycle_dense, utility_batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path, help="the new run directory (absent or empty)")
    parser.add_argument("--multiplier", type=int, default=2, help="new experts per pool = multiplier x old")
    parser.add_argument("--selection", choices=["uniform", "utility"], default="uniform")
    parser.add_argument("--utility-score", choices=["grad_sq", "weight_x_grad"], default="grad_sq")
    parser.add_argument("--utility-batches", type=int, default=10,
                        help="training batches the utility is averaged over (the design note: about 10)")
    parser.add_argument("--noise", type=float, default=1e-3,
                        help="U(-noise, noise) on the replicas' selection bias, a finite value >= 0 (read only with"
                             " moe.bias_balancing)")
    parser.add_argument("--optimizer", choices=["reset", "copy"], default="reset", help="AdamW state of the result")
    parser.add_argument("--to-config", type=Path, help="dense source: the MoE config to upcycle into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change the written config; repeatable")
    args = parser.parse_args(argv)
    if args.utility_batches < 1:  # the utility is a mean over them: none gives NaN scores
        parser.error(f"--utility-batches must be at least 1, not {args.utility_batches}")
    if not math.isfinite(args.noise) or args.noise < 0:
        parser.error(f"--noise must be a finite value of at least 0, not {args.noise}")
    if args.multiplier < 2:  # checked before loading and scoring, which take minutes on a real model
        parser.error(f"--multiplier must be at least 2, not {args.multiplier}")
    if args.selection == "utility" and args.multiplier - 1 > MAX_EXTRA:
        parser.error(f"--selection utility gives an expert at most {MAX_EXTRA} extra copies: --multiplier must be at"
                     f" most {MAX_EXTRA + 1}, not {args.multiplier}")
    try:
        recover_replaced_directory(args.output)
        check_replaceable_output(args.output, [args.checkpoint], force=True)  # emptiness: below, more precisely
        check_output_directory(args.output, f"--output {args.output}")
        check_output_directory(args.output.resolve().parent, f"--output {args.output}")  # the temporary beside it
        if args.output.is_dir() and any(args.output.iterdir()):  # written whole, in place of what is there
            held = "a checkpoint" if (checkpoints_dir(args.output) / LATEST).exists() else "files"
            raise CheckpointError(f"{args.output} already holds {held}; choose a new --output")
        source_path, payload, config = load_trained_state(args.checkpoint)
        if config.moe.kind != "dense" and args.to_config is not None:
            raise ValueError("--to-config is for a dense checkpoint; an MoE one keeps its config (change it with --set)")
        if config.moe.kind == "dense":
            if args.to_config is None:
                parser.error("the checkpoint is dense: give the MoE config to upcycle into with --to-config")
            ignored = [f"--{flag.replace('_', '-')}" for flag in ("multiplier", "selection", "optimizer", "noise", "seed",
                                                                   "utility_score", "utility_batches")
                       if getattr(args, flag) != parser.get_default(flag)]
            if ignored:
                print(f"warning: {', '.join(ignored)} ignored: a dense checkpoint's experts are copies of its FFNs, as"
                      " many as --to-config has", file=sys.stderr)
            target = reading_the_source_data(config, load_config(args.to_config, args.overrides, world_size=None),
                                             args.overrides, payload["train_state"]["consumed_samples"],
                                             payload["train_state"].get("tokenizer"))
            # upcycle_dense builds the target model and a state dict of it: two copies of its weights
            check_fits_host_memory(2 * param_budget(target.model, target.moe).total_params,
                                   "the upcycled model (built, then copied into its state)")
            result = upcycle_dense(config, payload["model"], target)
        else:
            budget = param_budget(config.model, config.moe)
            grown = budget.total_params + (args.multiplier - 1) * budget.expert_params
            copied = args.optimizer == "copy"  # then its two AdamW moments are built at the grown size too
            check_fits_host_memory(grown * (3 if copied else 1), f"the model upcycled x{args.multiplier}"
                                   + (" with its copied AdamW moments" if copied else ""))
            utility = None
            if args.selection == "utility":
                print(f"scoring experts by {args.utility_score} over {args.utility_batches} batches ...", flush=True)
                batches, eod_id = utility_batches(config, args.utility_batches, config.train.micro_batch)
                started = time.perf_counter()
                utility = expert_utility(
                    trained_model(payload, config), batches, args.utility_score, progress=lambda done: print(
                        f"  scored {done}/{len(batches)} batches in {time.perf_counter() - started:.0f} s", flush=True),
                    eod_id=eod_id)
            result = upcycle(config, payload["model"], payload["optimizer"], args.multiplier, args.selection, utility,
                             args.noise, args.optimizer, args.seed)
        result.config.checkpoint.resume, result.config.checkpoint.load = True, None  # the launcher starts from our checkpoint
        new_config = with_overrides(result.config, args.overrides)
        check_fits(new_config, result.model_state, "after --set, the upcycled weights")  # a --set changing shapes
        # or what the weights compute with the same shapes (the resume would refuse a head split, too late)
        check_same_function(result.config, new_config, "the upcycled weights")
        if config.moe.kind != "dense" and args.noise != parser.get_default("noise") and not new_config.moe.bias_balancing:
            print("warning: --noise has no effect: routers read the selection bias only with moe.bias_balancing, off in"
                  " the written config (the replicas' router rows separate through the aux loss's gradients)",
                  file=sys.stderr)
    except (CheckpointError, ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kept = ("tokenizer", "tokenizer_vocab_size", "eod_id",  # what its ids mean
            "training_content")  # what it read
    train_state = TrainState(consumed_samples=payload["train_state"]["consumed_samples"],  # the data position
                             **{key: payload["train_state"].get(key) for key in kept})
    try:
        write_directory(args.output, lambda directory: write_run_directory(
            directory, new_config, result.model_state, result.optimizer_state, asdict(train_state),
            published_as=args.output, upcycled_from=str(source_path), sources_per_pool=result.sources_per_pool))
    except CheckpointError as e:  # the output cannot be written (save_checkpoint's OSError), or holds a NaN
        print(f"error: --output {args.output}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output cannot be written (permissions, a full disk): nothing is left half-written
        print(f"error: --output {args.output}: {e.filename or args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    report(config, result, new_config)
    print(f"wrote {checkpoints_dir(args.output) / step_directory_name(0)} and {args.output / 'config.json'}; continue"
          f" with\n"
          f"  python launch/pretrain.py --config {args.output / 'config.json'} --run-dir {args.output}")
    return 0


def reading_the_source_data(source: Config, target: Config, overrides: list[str], consumed_samples: int,
                            tokenizer: Optional[str]) -> Config:
    """The dense source's `train.seed`, `data` and `model.document_masking` in place of --to-config's: the upcycled
    checkpoint continues at the source's position in its data (consumed samples), which in another seed's order or
    in other data would repeat some samples and skip others, and reads its documents as the source did. A --set of either wins; what replaced --to-config's is said. A source
    at sample 0 (an import) has no position to keep, but one recording the `tokenizer` its ids mean keeps its
    data.tokenizer (the import's --set named it)."""
    chosen = overridden_fields(overrides)
    if not consumed_samples:
        if tokenizer is None or ("data", "tokenizer") in chosen or source.data.tokenizer == target.data.tokenizer:
            return target
        print(f"note: the upcycled run keeps the source's data.tokenizer={source.data.tokenizer!r} (--to-config:"
              f" {target.data.tokenizer!r}): the model's ids are its tokens; --set data.tokenizer to choose",
              file=sys.stderr)
        return with_overrides(replace(target, data=replace(target.data, tokenizer=source.data.tokenizer)), [])
    kept = {name: getattr(source.data, name) for name in (f.name for f in fields(DataConfig)) if ("data", name) not in chosen}
    seed = target.train.seed if ("train", "seed") in chosen else source.train.seed
    # how the source read its samples' documents (attention within each), as it read its data
    masking = (target.model.document_masking if ("model", "document_masking") in chosen
               else source.model.document_masking)
    replaced = [f"data.{name}={value!r} (--to-config: {getattr(target.data, name)!r})" for name, value in kept.items()
                if value != getattr(target.data, name)]
    if seed != target.train.seed:
        replaced.insert(0, f"train.seed={seed} (--to-config: {target.train.seed})")
    if masking != target.model.document_masking:
        replaced.append(f"model.document_masking={masking} (--to-config: {target.model.document_masking})")
    if replaced:
        print(f"note: the upcycled run continues the source's data at sample {consumed_samples:,}, so it keeps the"
              f" source's {', '.join(replaced)}; --set them to read other data", file=sys.stderr)
    note = seq_len_note(target.model.seq_len, source.model.seq_len, "the source's", consumed_samples)
    if note:
        print(note, file=sys.stderr)
    return with_overrides(replace(target, data=replace(target.data, **kept), train=replace(target.train, seed=seed),
                                  model=replace(target.model, document_masking=masking)), [])


def report(source: Config, result: Upcycled, written: Config) -> None:
    """Where each new expert came from, and what the upcycling changed beyond the pool's size."""
    for p, sources in enumerate(result.sources_per_pool):
        if source.moe.kind == "dense":  # the sources are layer indices
            print(f"pool {p}: {len(sources)} experts copying the FFNs of layers {sorted(set(sources))}")
        else:
            copies = [sources.count(e) for e in range(max(sources) + 1)]
            print(f"pool {p}: {len(sources)} experts; copies per source: {copies}")
    if source.moe.kind == "dense":
        copied = {layer for sources in result.sources_per_pool for layer in sources}
        uncopied = [layer for layer in written.moe.moe_layers(written.model.num_layers) if layer not in copied]
        if uncopied:
            print(f"note: the FFNs of layers {uncopied} are in no expert: the pool has fewer experts than MoE layers",
                  file=sys.stderr)
    grown, before = result.config.moe.capacity_factor, source.moe.capacity_factor
    if source.moe.kind != "dense" and grown != before and written.moe.capacity_factor == grown:
        print(f"note: moe.capacity_factor {before} -> {grown}: capacity is per expert, so each keeps its slots (the"
              f" source's function at the first step), and the pool has {grown / before:g}x the slots in all; set it"
              f" back with --set moe.capacity_factor={before}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
