"""Checkpoints of everything a run needs to continue the same loss curve.

Layout: <run_dir>/checkpoints/step_000100/state.pt and a `latest` file naming the newest. A
checkpoint is written under a temporary name, fsynced and renamed (and the directory fsynced),
and `latest` is replaced last, so a crash or SIGKILL while saving leaves the previous checkpoint
loadable. The one just written and the `keep_last - 1` other highest steps are kept. A payload
holding a NaN is refused: resuming from it could only reproduce the failure. (Infinities are
allowed: -inf is how UniPool-lock masks logits.) Checkpoints hold only tensors and plain Python
values and are read with torch.load(weights_only=True): loading one cannot run code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import socket
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..config import Config, ConfigError, ModelConfig, config_from_dict, config_to_dict
from ..model import LanguageModel
from .outputs import write_refusal

LATEST = "latest"
PAYLOAD_KEYS = ("model", "optimizer", "train_state", "rng", "config")  # what checkpoint_payload writes
_STEP_DIRECTORY = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict:
    """Every RNG, in types torch.load(weights_only=True) reads: numpy's key array as a list."""
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), *rest], "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])


# what checkpoints written before numpy's RNG keys became a list need, beyond weights_only's types:
# numpy's array reconstruction (data only; no global can run code)
_NUMPY_ARRAY_GLOBALS = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_directory(path: Path) -> None:
    """Make renames inside `path` durable (a rename is an update of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nan_tensors(payload: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) payload that hold a NaN."""
    if isinstance(payload, torch.Tensor):
        return [prefix] if payload.is_floating_point() and bool(torch.isnan(payload).any()) else []
    if isinstance(payload, dict):
        return [name for key, value in payload.items()
                for name in nan_tensors(value, f"{prefix}.{key}" if prefix else str(key))]
    return []


def step_directory_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    bad = nan_tensors(payload)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(f"refusing to write the step {step} checkpoint: NaN in {shown}")
    try:
        written = _write_checkpoint(directory, step, payload)
    except OSError as error:  # a full disk, a permission or a file in the way: one line, not a traceback
        raise CheckpointError(f"cannot write the step {step} checkpoint in {directory}: {os_error_text(error)}") from error
    try:
        _prune(directory, written, keep_last)  # removes the replaced checkpoint too, now that `latest` is updated
    except OSError as error:
        raise CheckpointError(f"wrote {written} (now latest), but could not remove older checkpoints:"
                              f" {os_error_text(error)}") from error
    return written


def os_error_text(error: OSError) -> str:
    """An OSError in a line for the user: what failed and on which file."""
    return f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")


def _write_checkpoint(directory: Path, step: int, payload: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = step_directory_name(step)
    final, temporary = directory / name, directory / f".{name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        with open(temporary / "state.pt", "wb") as f:
            _torch_save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk gets its space back; an interrupted save was never published anyway
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    replaced = _replaced(final)
    if final.exists():  # a run that went back saves this step again; `latest` may name it: set it aside, not delete
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(temporary, final)
    _fsync_directory(directory)
    _fsync_write(directory / f".{LATEST}.tmp", name.encode())
    os.replace(directory / f".{LATEST}.tmp", directory / LATEST)
    _fsync_directory(directory)
    return final


def _torch_save(payload: dict[str, Any], file) -> None:
    """torch.save, raising the OSError of a full disk (or a file size limit) that torch's zip writer replaces by
    a RuntimeError of its own ("unexpected pos"); its other errors, and a KeyboardInterrupt it replaced (the
    launcher tells an interrupted save by it), are raised as they come."""
    try:
        torch.save(payload, file)
    except RuntimeError as error:
        cause = error.__context__
        while cause is not None and not isinstance(cause, (OSError, KeyboardInterrupt)):
            cause = cause.__context__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror, file.name) from error
        raise


def _replaced(checkpoint: Path) -> Path:
    """Where a save of the same step keeps the checkpoint it replaces until `latest` is updated: a kill
    between its two renames leaves `latest` naming a missing step, which resumes from here."""
    return checkpoint.with_name(f".{checkpoint.name}.old")


def _prune(directory: Path, written: Path, keep_last: int) -> None:
    """Keep `written` and the `keep_last - 1` highest steps below it, ordered by number, not name
    (step_10000000 sorts before step_9999999); remove what saves killed half-way left (.step_N.tmp), and
    checkpoints a save of their step replaced (.step_N.old).
    Higher steps belong to a run this one went back from (checkpoint.load of an earlier step): they
    are neither counted nor removed (this run replaces each when it saves that step), so the earlier
    checkpoint it started from is not the first to go. Step 0 is a tool's (upcycle, import): the start its
    config.json's checkpoint.load names for other run directories; never counted nor removed either."""
    step = int(_STEP_DIRECTORY.fullmatch(written.name).group(1))
    earlier = [(number, path) for number, path in step_directories(directory) if 0 < number < step]
    for _, old in earlier[:max(0, len(earlier) - (keep_last - 1))]:
        if old.is_symlink():  # the checkpoint it points to is not ours to delete
            old.unlink()
        else:
            shutil.rmtree(old)
    for unfinished in (*directory.glob(".step_*.tmp"), *directory.glob(".step_*.old")):
        shutil.rmtree(unfinished, ignore_errors=True)


def holds_whole_checkpoint(step_dir: Path) -> bool:
    """Whether `step_dir` holds a state.pt torch.save finished (a zip archive): not empty, not cut short."""
    state = step_dir / "state.pt"
    return state.is_file() and zipfile.is_zipfile(state)


def step_directories(directory: Path) -> list[tuple[int, Path]]:
    """The step_* directories in `directory`, by step number (not name: step_10000000 sorts before step_9999999)."""
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), path) for path in directory.iterdir()
                  if path.is_dir() and (m := _STEP_DIRECTORY.fullmatch(path.name)))


def checkpoint_payload(config: Config, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, dict],
                       train_state: dict, **extra) -> dict[str, Any]:
    """What a checkpoint holds (full-model tensors by name, the run's state, RNGs, config), plus `extra`."""
    return {"model": model_state, "optimizer": optimizer_state, "train_state": train_state, "rng": rng_state(),
            "config": config_to_dict(config), **extra}


def checkpoints_dir(run_dir: Path) -> Path:
    """Where a run directory keeps its step_* checkpoints and the `latest` pointer."""
    return Path(run_dir) / "checkpoints"


# What a run writes in its directory: directories and files, each of which something else may be in the way of
RUN_DIRECTORIES, RUN_FILES = ("checkpoints", "tensorboard"), ("summary.json", "checkpoints/latest")


def check_run_directory(run_dir: Path) -> None:
    """A CheckpointError before training, not a traceback at the first save: a file where the run writes a
    directory, or a directory where it writes a file, a checkpoints/ directory that takes no file, or another
    job training in it (hold_run_directory)."""
    run_dir = Path(run_dir)
    for name, is_right in [(n, Path.is_dir) for n in RUN_DIRECTORIES] + [(n, Path.is_file) for n in RUN_FILES]:
        path = run_dir / name
        if (path.exists() or path.is_symlink()) and not is_right(path):  # a dangling link is in the way too
            kind = "a directory" if is_right is Path.is_dir else "a file"
            raise CheckpointError(f"run directory {run_dir}: {name} must be {kind}; move away what is there")
    writable = checkpoints_dir(run_dir) if checkpoints_dir(run_dir).is_dir() else run_dir
    refusal = write_refusal(writable)
    if refusal:
        raise CheckpointError(f"run directory {run_dir}: cannot write in {writable} ({refusal})")
    with hold_run_directory(run_dir):  # another job training here is refused now, not after the data and the model
        pass


RUN_LOCK = ".lock"


@contextlib.contextmanager
def hold_run_directory(run_dir: Path) -> Iterator[None]:
    """One job at a time in a run directory: a second one (a duplicate submission, a requeue while the first
    still runs) would overwrite its checkpoints and summary.json. An exclusive flock on run_dir/.lock while the
    job trains, which the kernel drops when the process ends, killed or not; a file system without flock
    (Lustre mounted without it) runs unlocked. The file names the holder and stays."""
    with open(Path(run_dir) / RUN_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise CheckpointError(f"run directory {run_dir} is in use by another job ({lock.read().strip()}), whose"
                                  " checkpoints and summary this one would overwrite: wait for it to end, or choose"
                                  " another run directory") from None
        except OSError:  # no flock here: unlocked, as without this
            pass
        else:
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
        yield


def remove_unused_run_directory(run_dir: Path) -> None:
    """A run directory a failed job made and left holding nothing but its lock file, removed."""
    with contextlib.suppress(OSError):
        if [path.name for path in Path(run_dir).iterdir()] == [RUN_LOCK]:
            (Path(run_dir) / RUN_LOCK).unlink()
        Path(run_dir).rmdir()


def write_run_directory(directory: Path, config: Config, model_state: dict[str, torch.Tensor],
                        optimizer_state: dict[str, dict], train_state: dict, published_as: Optional[Path] = None,
                        **provenance) -> None:
    """A new run directory that launch/pretrain.py continues: checkpoints/step_0000000 and config.json.
    For tools that make a model (upcycling, imports); `provenance` is stored in the checkpoint.

    Unless `config` names another checkpoint.load, the written config loads that checkpoint by its
    absolute path, so that a launch with any --run-dir starts from these weights, not from a fresh
    model (in the run directory itself, resuming finds them first). `published_as`: the run
    directory's final path, when `directory` is a temporary one the caller renames (write_directory)."""
    if config.checkpoint.load is None:
        written_at = checkpoints_dir(Path(published_as or directory)) / step_directory_name(0)
        config = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint,
                                                                           load=str(written_at.resolve())))
    payload = checkpoint_payload(config, model_state, optimizer_state, train_state, **provenance)
    save_checkpoint(checkpoints_dir(directory), 0, payload, keep_last=config.checkpoint.keep_last)
    (directory / "config.json").write_text(json.dumps(payload["config"], indent=2) + "\n")


def latest_checkpoint(directory: Path) -> Optional[Path]:
    """The checkpoint `latest` names. Without the pointer, the highest step_* holding a whole state.pt: a save
    killed between its rename and the pointer's write, or the pointer removed, must not restart the run from
    step 0 (over its checkpoints)."""
    pointer = directory / LATEST
    if not pointer.is_file():
        complete = [path for _, path in step_directories(directory) if holds_whole_checkpoint(path)]
        return complete[-1] if complete else None
    try:
        name = pointer.read_text().strip()
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{pointer} is damaged: not text ({error.reason} at byte {error.start})") from error
    if re.fullmatch(r"global_step\d+", name):
        raise CheckpointError(f"{directory} holds a DeepSpeed engine checkpoint ({pointer} names {name!r}): only this"
                              " project's own step_* checkpoints are read (launch/pretrain.py writes them, with or"
                              " without deepspeed.enabled)")
    if not _STEP_DIRECTORY.fullmatch(name):
        raise CheckpointError(f"{pointer} is damaged: it holds {name[:80]!r}, not the name of a step_* directory")
    path = directory / name
    if not (path / "state.pt").is_file():
        if (_replaced(path) / "state.pt").is_file():  # killed while a save of the same step swapped it
            return _replaced(path)
        raise CheckpointError(f"{pointer} names {path.name}, which has no state.pt{_earlier_checkpoint_hint(path)}")
    return path


def _earlier_checkpoint_hint(step_dir: Path) -> str:
    """For an error about a step_* directory: the highest earlier step with a state.pt, to continue from."""
    match = _STEP_DIRECTORY.fullmatch(step_dir.name)
    if not match:
        return ""
    earlier = [path for number, path in step_directories(step_dir.parent)
               if number < int(match.group(1)) and holds_whole_checkpoint(path)]
    return (f"; {earlier[-1]} is whole: load it instead (the launcher: --set checkpoint.resume=false --set"
            f" checkpoint.load={earlier[-1]})" if earlier else "")


def checkpoint_to_resume(config: Config, run_dir: Path) -> Optional[Path]:
    """The run directory's own latest checkpoint (with checkpoint.resume) wins, so a rerun continues where
    it stopped; checkpoint.load only starts a run directory that has none. A fresh start
    (checkpoint.resume=false, no checkpoint.load) is refused in a run directory that holds checkpoints: its
    saves would replace them, and pruning remove the rest."""
    directory = checkpoints_dir(run_dir)
    if config.checkpoint.resume:
        path = latest_checkpoint(directory)
    else:
        path, held = None, [(n, p) for n, p in step_directories(directory) if (p / "state.pt").is_file()]
        if held and not config.checkpoint.load:
            raise CheckpointError(
                f"{directory} holds {len(held)} checkpoint(s), up to {held[-1][1].name}, that a fresh run"
                " (checkpoint.resume=false) would overwrite: use another --run-dir, remove them, or set"
                " checkpoint.load to the step to go back to")
    return resolve_checkpoint(config.checkpoint.load) if path is None and config.checkpoint.load else path


def resolve_checkpoint(path: Path) -> Path:
    """A run directory (its latest checkpoint), a checkpoints directory, or one step_* directory."""
    path = Path(path)
    for directory in (checkpoints_dir(path), path):
        found = latest_checkpoint(directory)  # None without a pointer or a whole step there
        if found is not None:
            return found
    if (path / "state.pt").is_file() or (path.is_file() and (path.name == "state.pt" or zipfile.is_zipfile(path))):
        return path  # a file torch.save wrote (a zip archive), or a damaged state.pt: load_checkpoint says which
    raise CheckpointError(f"no checkpoint at {path}: expected a run directory, its checkpoints/ directory or a"
                          " step_* directory holding state.pt")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint directory (or its state.pt)."""
    path = Path(path)
    file = path / "state.pt" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a step_* directory holding state.pt)")
    # weights_only: tensors and plain containers, so a crafted file cannot run code when loaded; mmap:
    # the ranks of a node share one copy in the page cache (copy-on-write) instead of reading one each
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; torch.load's own message is about mmap
        what = "empty" if file.stat().st_size == 0 else "not a torch.save archive (truncated, or another file)"
        raise CheckpointError(f"checkpoint {file} is {what}{_earlier_checkpoint_hint(file.parent)}")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            payload = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file, or one holding objects: say which
        raise CheckpointError(f"checkpoint {file} cannot be read ({str(e).strip().splitlines()[-1][:300]})"
                              f"{_earlier_checkpoint_hint(file.parent)}") from e
    missing = [key for key in PAYLOAD_KEYS if key not in payload] if isinstance(payload, dict) else list(PAYLOAD_KEYS)
    if missing:  # another program's torch.save file: its users would fail on a KeyError
        raise CheckpointError(f"{file} is not a megatron_unipool checkpoint (missing {', '.join(missing)})")
    return payload


def training_fingerprint(payload: dict[str, Any]) -> str:
    """Where a checkpoint's run stood (step, samples, a hash of its losses): alike for copies of one checkpoint
    file, different for another run's checkpoint of the same step, without reading its tensors."""
    state = payload["train_state"]
    history = {key: state.get(key) for key in ("step", "consumed_samples", "train_losses", "val_losses")}
    digest = hashlib.blake2b(json.dumps(history).encode(), digest_size=8)
    return f"step {state['step']}, {state['consumed_samples']:,} samples, history hash {digest.hexdigest()}"


LOCK_PREFIX = "pool_locks."  # UniPool-lock's buffers: run state, not weights


def restore_model(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load weights, naming every missing, unexpected or differently shaped tensor."""
    problems = _misfits(model, state)
    if any(LOCK_PREFIX in problem for problem in problems):  # one line for the lock's buffers, saying why
        problems = [problem for problem in problems if LOCK_PREFIX not in problem] + [
            "the UniPool-lock state (pool_locks.*): the checkpoint's run and this config differ in moe.lock_start_step"
            " or in their pools; a lock is switched on at a resume only before its window opens, and off only before"
            " it assigned the experts"]
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit this model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state)


def adopt_lock_change(model: LanguageModel, state: dict[str, torch.Tensor], trained_steps: int) -> dict[str, torch.Tensor]:
    """The checkpoint's model state for a resume that switches UniPool-lock on or off where that changes nothing:
    on up to the step its window opens (moe.lock_start_step - lock_window_steps: until then its buffers keep their
    initial values, the model's own), off before it has assigned the experts (until then it offsets no logit).
    Any other difference in the lock's state is left for restore_model to name."""
    own = {key: value for key, value in model.state_dict().items() if key.startswith(LOCK_PREFIX)}
    saved = {key: value for key, value in state.items() if key.startswith(LOCK_PREFIX)}
    moe = model.moe_config
    if own and not saved and trained_steps <= moe.lock_start_step - moe.lock_window_steps:
        return {**state, **own}
    if saved and not own and all((value < 0).all() for key, value in saved.items() if key.endswith(".owner")):
        return {key: value for key, value in state.items() if key not in saved}
    return state


# What weights compute beyond their shapes: a model differing here can fit every tensor (8 heads of 16 and 4
# KV heads fit 4 heads of 32 and 2) and compute another function from them.
COMPUTED_BY_THE_WEIGHTS = ("num_heads", "num_kv_heads", "rope_base", "norm_eps", "tie_embeddings")
# Of those, what no continued run changes on purpose (a RoPE base may be raised for longer contexts)
HEAD_SPLIT_FIELDS = ("num_heads", "num_kv_heads")
# What the resume's note leaves out: how the model computes (kernels, the router's TF32) and what computes the
# same numbers (micro-batching, determinism), what has a note of its own (seq_len, max_steps, seed), what acted
# only before the resumed step (init_std) and what runs beside training (evaluation, the skip limit)
_UNCOMPARED = {"model": ModelConfig.KERNEL_FIELDS + ("seq_len", "init_std"), "moe": ("router_tf32",),
               "train": ("max_steps", "seed", "micro_batch", "max_consecutive_skips", "deterministic", "adamw",
                         "cross_entropy", "eval_interval", "eval_batches"),
               "data": ("cache_dir", "valid_per_file")}
# Optional model/MoE fields whose unset value is derived from others (a real change there changes shapes, which
# restore_model refuses); the other Optional ones mean something of their own when unset (capacity_factor: dropless,
# norm_router_c: c(M, k)), so unset <-> set is a change of what the model computes
_DERIVED_WHERE_UNSET = ("pool_size", "layers_per_pool", "expert_ffn_hidden_size")


def _micro_batch_matters(moe: dict) -> bool:
    """Whether train.micro_batch changes the numbers: capacity, the per-layer aux loss, the micro-batch lag of the
    pool loss and UniPool-lock's entropy loss are per micro-batch (docs/design.md, Loss normalisation)."""
    return moe.get("kind") != "dense" and (moe.get("capacity_factor") is not None or moe.get("aux_loss") == "layer"
                                           or (moe.get("aux_loss") == "pool" and moe.get("pool_aux_lag") == "micro_batch")
                                           or (moe.get("lock_entropy_coeff") or 0) > 0)


def function_changes(before: dict, after: dict, fields: tuple[str, ...] = COMPUTED_BY_THE_WEIGHTS) -> list[str]:
    """'model.X=after (the checkpoint's is before)' for each of `fields` where two model sections (as
    config_to_dict writes them) differ."""
    return [f"model.{name}={after[name]!r} (the checkpoint's is {before[name]!r})" for name in fields
            if name in before and before[name] != after[name]]


def check_same_function(before: Config, after: Config, what: str) -> None:
    """ConfigError naming each COMPUTED_BY_THE_WEIGHTS field a --set changed from `before` (the config `what`
    were trained with) to `after`: for tools that write weights beside a config."""
    if changed := function_changes(config_to_dict(before)["model"], config_to_dict(after)["model"]):
        raise ConfigError(f"--set would change what {what} compute:\n  " + "\n  ".join(changed))


def changed_settings(saved_config: dict, config: Config, trained_steps: int = 1) -> dict[str, tuple[Any, Any]]:
    """{"section.key": (the checkpoint's value, this run's)} for each setting of what the model computes, how it
    is optimised or what data it reads that differs from the checkpoint's run (not _UNCOMPARED). Not compared
    either: keys an older checkpoint lacks, a model or MoE value left unset on either side (derived, as a full
    pool's size: a real change there changes shapes, refused anyway), the MoE settings of a model that is
    dense in both, and the train and data settings of a checkpoint of step 0 (`trained_steps`: an import or an
    upcycled model, whose tools leave them to be set before it trains)."""
    current = config_to_dict(config)
    changed = {}
    for section in _UNCOMPARED:
        if section in ("train", "data") and trained_steps == 0:  # what the tools wrote: ours to set now
            continue
        saved = saved_config.get(section, {})
        if section == "moe" and saved.get("kind") == "dense" and current["moe"]["kind"] == "dense":
            continue
        uncompared = _UNCOMPARED[section]
        if section == "train" and any(map(_micro_batch_matters, (saved_config.get("moe", {}), current["moe"]))):
            uncompared = tuple(key for key in uncompared if key != "micro_batch")
        for key, value in current[section].items():
            if key in uncompared or key not in saved or saved[key] == value:
                continue
            if key in _DERIVED_WHERE_UNSET and None in (saved[key], value):  # derived where unset
                continue
            changed[f"{section}.{key}"] = (saved[key], value)
    return changed


def check_same_head_split(saved_config: dict, config: Config, source: Path | str) -> None:
    """CheckpointError for a head split other than the checkpoint's run's (HEAD_SPLIT_FIELDS): for weights that
    fit, as restore_model finds first (a checkpoint of other shapes is better told by its tensors)."""
    split = function_changes(saved_config.get("model", {}), config_to_dict(config)["model"], HEAD_SPLIT_FIELDS)
    if split:
        raise CheckpointError(f"checkpoint {source} was trained with another attention head split: {', '.join(split)};"
                              " its tensors fit, but each head would read another's weights: set these back")


def check_fits(config: Config, state: dict[str, torch.Tensor], what: str) -> None:
    """CheckpointError unless `state` fits the model `config` describes (built on the meta device: no
    memory, no initialisation), for tools that write a config beside weights."""
    with torch.device("meta"):
        model = LanguageModel(config.model, config.moe)
    problems = _misfits(model, state)
    if problems:
        raise CheckpointError(f"{what} do not fit the model its config describes:\n  " + "\n  ".join(problems))


def _misfits(model: LanguageModel, state: dict[str, torch.Tensor]) -> list[str]:
    """Every missing, unexpected or differently shaped tensor of `state`, named, and an untied output layer
    for a tied model (both names are in its state dict, with the same shapes; loading would keep the output)."""
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if (model.output.weight is model.embedding.weight and not problems
            and not torch.equal(state["output.weight"], state["embedding.weight"])):
        problems.append("output.weight differs from embedding.weight, which model.tie_embeddings=true makes one tensor")
    return problems


def load_trained_state(checkpoint: Path) -> tuple[Path, dict[str, Any], Config]:
    """(checkpoint path, payload, config) of a run or step_* directory, its weights checked against the model
    its config describes, for tools that read the weights as tensors: no model is built beside them."""
    path = resolve_checkpoint(checkpoint)
    payload = load_checkpoint(path)
    config = config_from_dict(payload["config"], world_size=None, stored=True)
    check_fits(config, payload["model"], f"the weights of checkpoint {path}")
    return path, payload, config


def trained_model(payload: dict[str, Any], config: Config) -> LanguageModel:
    """The model computing with the weights ``load_trained_state`` read (and checked), for tools that run it.
    It computes with the default kernels (a GPU run's Triton or flash-attn settings would not run on the
    machine a tool reads it on); the config keeps the run's own."""
    model = LanguageModel(config.model.with_default_kernels(), config.moe)
    model.load_state_dict(payload["model"])
    return model


def load_trained_model(checkpoint: Path) -> tuple[Path, dict[str, Any], Config, LanguageModel]:
    """``load_trained_state`` and ``trained_model`` of a run or step_* directory."""
    path, payload, config = load_trained_state(checkpoint)
    return path, payload, config, trained_model(payload, config)
