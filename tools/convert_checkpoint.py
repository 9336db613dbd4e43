"""Convert checkpoints between this project and Hugging Face (docs/interop.md).

    python tools/convert_checkpoint.py --to hf --checkpoint runs/tiny_vanilla_cpu --output hf/tiny_vanilla
    python tools/convert_checkpoint.py --from hf --checkpoint path/to/llama --output runs/llama [--set k=v ...]
    python tools/upcycle.py --checkpoint runs/llama --to-config MOE_CONFIG.json --output runs/llama_moe

--to hf: a run directory (its latest checkpoint) or a step_* directory becomes config.json and
model.safetensors of the Hugging Face class that computes the same logits (LlamaForCausalLM,
MixtralForCausalLM or Qwen2MoeForCausalLM), loadable with AutoModelForCausalLM.from_pretrained;
a model none of them can express is refused, naming why.

--from hf: a LlamaForCausalLM directory (config.json and model.safetensors, or shards listed in
model.safetensors.index.json) becomes a run directory with config.json and checkpoints/step_0000000
(fresh optimizer, step 0): continue pretraining it with launch/pretrain.py or upcycle it to MoE
with tools/upcycle.py. Sections other than `model` keep our defaults; `--set` changes them.

The output is written into a temporary directory next to it and renamed when complete, so a
failure leaves nothing half-written; an existing non-empty output is replaced only with --force.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

try:
    import megatron_unipool  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors import SafetensorError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from megatron_unipool.config import Config, ConfigError, MoEConfig, overridden_fields, with_overrides  # noqa: E402
from megatron_unipool.data import DataError, Tokenizer, build_tokenizer  # noqa: E402
from megatron_unipool.model.hf_format import from_hf_llama, llama_model_config, to_hf  # noqa: E402
from megatron_unipool.training import CheckpointError, TrainState  # noqa: E402
from megatron_unipool.training.checkpoint import (check_fits, check_same_function, load_trained_state,  # noqa: E402
                                                  resolve_checkpoint, write_run_directory)
from megatron_unipool.training.outputs import (check_output_directory, check_replaceable_output,  # noqa: E402
                                               recover_replaced_directory, write_directory)

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"


def describe(tensors: dict) -> str:
    """Count, parameters and bytes, a tied tensor once."""
    unique = {(t.data_ptr(), t.shape): t for t in tensors.values()}.values()
    count = sum(t.numel() for t in unique)
    size = sum(t.numel() * t.element_size() for t in unique)
    return f"{len(tensors)} tensors, {count / 1e6:.2f}M parameters, {size / 2**20:.1f} MiB"


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a CheckpointError naming the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def read_hf_directory(directory: Path) -> tuple[dict, dict]:
    """config.json and all tensors of a Hugging Face checkpoint directory (safetensors, maybe sharded).
    config.json and the index are checked first, so a bad one is named before any shard is read."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory} has no config.json: expected a Hugging Face model directory")
    config = read_json(config_file)
    try:
        llama_model_config(config)
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from e
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(name, str) and name for name in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map object (tensor name -> shard file); re-save the model"
                                  " with transformers' save_pretrained")
        files = sorted(set(weight_map.values()))
    elif (directory / SAFETENSORS).is_file():
        files = [SAFETENSORS]
    else:
        raise CheckpointError(f"{directory} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX} (only safetensors"
                              " checkpoints are read; convert pytorch_model.bin with transformers' save_pretrained)")
    tensors = {}
    for name in files:
        print(f"reading {directory / name} ...", flush=True)
        try:
            tensors.update(load_file(directory / name))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{directory / name} cannot be read ({e})") from e
    return config, tensors


def export_hf(args) -> None:
    source, payload, config = load_trained_state(args.checkpoint)
    hf_config, tensors = to_hf(config.model, config.moe, payload["model"])
    architecture = hf_config["architectures"][0]
    print(f"{source}: {config.moe.kind} model ({describe(payload['model'])}) -> {architecture} ({describe(tensors)})")
    if config.moe.kind == "unipool":
        experts = hf_config.get("num_local_experts", hf_config.get("num_experts"))
        print(f"  the shared pool is copied into each of the {len(config.moe.moe_layers(config.model.num_layers))}"
              f" MoE layers ({experts} experts each)")

    if config.model.document_masking:
        print("  note: trained with model.document_masking: on one document (a prompt, a generation) the Hugging Face"
              " model computes the same logits; given several documents packed in one sequence it attends across"
              " them unless the caller masks each document")

    def fill(directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(tensors, directory / SAFETENSORS, metadata={"format": "pt"})
        # safetensors writes its file for its owner alone (0600), whatever the umask: as config.json is, so
        # that the others who load models from a shared directory can read it
        umask = os.umask(0)
        os.umask(umask)
        (directory / SAFETENSORS).chmod(0o666 & ~umask)

    write_directory(args.output, fill)
    print(f"wrote {args.output / 'config.json'} and {args.output / SAFETENSORS}; load with\n"
          f"  transformers.AutoModelForCausalLM.from_pretrained({str(args.output)!r})")


def check_tokenizer(config: Config) -> Tokenizer:
    """data.tokenizer, or a CheckpointError unless it loads and its ids fit the imported model's vocabulary."""
    try:
        tokenizer = build_tokenizer(config.data.tokenizer)
    except (OSError, DataError) as e:
        raise CheckpointError(f"data.tokenizer={config.data.tokenizer!r}: {e}") from e
    if tokenizer.vocab_size > config.model.vocab_size:
        raise CheckpointError(f"data.tokenizer={config.data.tokenizer!r} has {tokenizer.vocab_size} tokens, more than"
                              f" the imported model's vocabulary of {config.model.vocab_size}: give the model's own"
                              " tokenizer.json")
    return tokenizer


def import_hf(args) -> None:
    hf_config, tensors = read_hf_directory(args.checkpoint)
    model_config, state = from_hf_llama(hf_config, tensors)
    config = with_overrides(Config(model=model_config, moe=MoEConfig(kind="dense")), args.overrides)
    # what the weights compute besides their shapes (which check_fits compares): a --set may not change it
    check_same_function(Config(model=model_config), config, "the imported weights")
    check_fits(config, state, f"the weights of {args.checkpoint}, after --set,")
    ids_of = {}  # the tokenizer the model's ids mean, recorded when --set names it (checked now, not at training)
    if ("data", "tokenizer") in overridden_fields(args.overrides):
        tokenizer = check_tokenizer(config)
        ids_of = {"tokenizer": tokenizer.name, "tokenizer_vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id}
    print(f"{args.checkpoint}: LlamaForCausalLM -> dense model ({describe(state)})")

    write_directory(args.output, lambda directory: write_run_directory(
        directory, config, state, {}, asdict(TrainState(**ids_of)), published_as=args.output,
        imported_from=str(args.checkpoint.resolve())))
    tokenizer = args.checkpoint / "tokenizer.json"
    hint = f" (this model's is {tokenizer})" if tokenizer.is_file() else ""
    print(f"wrote {args.output / 'checkpoints' / 'step_0000000'} and {args.output / 'config.json'}\n"
          f"check before training (--set section.key=value here, or edit config.json):\n"
          f"  data: our defaults (data.corpus={config.data.corpus!r}, data.tokenizer={config.data.tokenizer!r});"
          f" set data.tokenizer to the model's tokenizer.json{hint} and the corpus or data.train_prefix/valid_prefix\n"
          f"  model.seq_len={config.model.seq_len} (max_position_embeddings: {model_config.seq_len}) is also the training"
          f" sequence length\n"
          f"  train: our defaults (lr {config.train.lr}, {config.train.max_steps} steps, batch {config.train.global_batch})\n"
          f"continue with\n  python launch/pretrain.py --config {args.output / 'config.json'} --run-dir {args.output}\n"
          f"or upcycle to MoE with\n  python tools/upcycle.py --checkpoint {args.output} --to-config MOE_CONFIG.json"
          f" --output OUT")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf"], help="export our checkpoint to a Hugging Face directory")
    direction.add_argument("--from", dest="from_", choices=["hf"], help="import a Hugging Face LlamaForCausalLM")
    parser.add_argument("--checkpoint", required=True, type=Path, help="--to: run or step_* directory; --from: HF directory")
    parser.add_argument("--output", required=True, type=Path, help="--to: HF directory; --from: new run directory")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="--from: change the written config; repeatable")
    args = parser.parse_args(argv)
    if args.to and args.overrides:
        parser.error("--set applies to --from hf (the exported config follows the checkpoint)")
    try:
        sources = [args.checkpoint] + ([resolve_checkpoint(args.checkpoint)] if args.to else [])
        recover_replaced_directory(args.output)
        check_replaceable_output(args.output, sources, args.force)
        check_output_directory(args.output.parent, f"--output {args.output}")  # --force may replace a file there
        if args.to:
            export_hf(args)
        else:
            import_hf(args)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output cannot be written (permissions, a full disk): nothing was replaced
        print(f"error: --output {args.output}: {e.filename or args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
