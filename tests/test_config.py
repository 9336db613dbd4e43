"""Config loading: every bad field is named; overrides are type-checked; shipped configs load."""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_unipool.config import ConfigError, config_from_dict, config_to_dict, load_config
from megatron_unipool.model import LanguageModel, param_budget

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.json"))


@pytest.mark.parametrize(
    "override,named",
    [
        ("moe.kind=mixture", "moe.kind: 'mixture' is not one of 'dense', 'vanilla', 'unipool'"),
        ("moe.router=top2", "moe.router"),
        ("moe.top_k=1.5", "moe.top_k: expected int, got float"),
        ("moe.top_k=0", "moe.top_k: 0 must be >= 1"),
        ("moe.top_k=33", "moe.top_k=33 exceeds the 32 experts"),
        ("moe.pool_size=0", "moe.pool_size: 0 must be >= 1"),
        ("moe.capacity_factor=0", "moe.capacity_factor: 0.0 must be > 0.0"),
        ("moe.layers_per_pool=3", "moe.layers_per_pool=3 must divide the 4 MoE layers"),
        ("moe.aux_loss=global", "moe.aux_loss"),
        ("moe.flavour=1", "unknown key moe.flavour"),
        ("model.num_heads=3", "model.hidden_size=128 must be divisible by model.num_heads=3"),
        ("model.num_kv_heads=3", "model.num_heads=4 must be divisible by model.num_kv_heads=3"),
        ("model.hidden_size=true", "model.hidden_size: expected int, got bool"),
        ("model.init_std=0", "model.init_std: 0.0 must be > 0.0"),
        ("model.attention=xformers", "model.attention"),
        ("model.expert_gemm=cutlass", "model.expert_gemm: 'cutlass' is not one of 'auto', 'grouped_mm', 'loop'"),
        ("model.rms_norm=triton", "model.rms_norm"),
        ("model.activation_checkpointing=full", "model.activation_checkpointing: 'full' is not one of"),
        ("train.adamw=sgd", "train.adamw"),
        ("train.deterministic=maybe", "train.deterministic"),
        ("train.max_steps=0", "train.max_steps: 0 must be >= 1"),
        ("train.precision=fp16", "train.precision: 'fp16' is not one of 'fp32', 'bf16'"),
        ("train.global_batch=10", "train.global_batch=10 must be a multiple of train.micro_batch=4"),
        ("train.lr=-1", "train.lr: -1.0 must be >= 0.0"),
        ("train.beta2=1.5", "train.beta2: 1.5 must be < 1.0"),
        ("train.beta1=1", "train.beta1: 1.0 must be < 1.0"),  # AdamW refuses it when it is built
        ("train.seed=18446744073709551616", "train.seed: 18446744073709551616 must be <= 18446744073709551615"),
        ("moe.norm_router_c=0", "moe.norm_router_c: 0.0 must be > 0.0"),  # every score 0: no token reaches an expert
        # options of another router, silently ignored before
        ("moe.softmax_before_topk=false", "moe.softmax_before_topk=false (top-k on the logits, softmax over the k)"
                                          " applies to moe.router='softmax' only, not 'norm'"),
        ("moe.normalize_gates=true", "moe.normalize_gates applies to the softmax and sigmoid routers"),
        ("moe.norm_router_c=3", None),  # the tiny config's router is the NormRouter: accepted
        ("moe.expert_ffn_hidden_size=64", None),
        ("moe.granularity=0.5", None),
        ("train.min_lr=1", "train.min_lr=1.0 must not exceed train.lr"),
        ("parallel.tp=2", "world size 1 must be divisible by parallel.tp=2"),
        ("parallel.ep=3", "32 experts per pool must be divisible by parallel.ep=3"),
        ("data.corpus=null", "data.train_prefix and data.valid_prefix are required"),
        ("data.corpus=wikipedia", "data.corpus"),
        ("train.adam_eps=0", "train.adam_eps: 0.0 must be > 0.0"),  # 0/0 for a weight that never had a gradient
        ("train.min_lr=0.002", None),  # equal to train.lr: a constant rate after warm-up
        ("model.rope_base=0", "model.rope_base: 0.0 must be > 0.0"),
        ("model.hidden_size=12", "must be even for RoPE"),  # 12 / 4 heads: head_dim 3
        ("model.hidden_size=null", "model.hidden_size: null is not allowed"),
        ("parallel.timeout_s=0.5", "parallel.timeout_s: 0.5 must be >= 1.0"),
        ("deepspeed.zero_stage=3", "deepspeed.zero_stage: 3 must be <= 2"),  # DeepSpeed's MoE refuses ZeRO-3
        ("moe.top_k=32", None),  # every expert of the pool
        ("moe.moe_layer_interval=5", "leaves no MoE layer"),
        ("moe.kind=vanilla", "moe.aux_loss='pool' needs moe.kind='unipool'"),
        ("logging.log_interval=0", "logging.log_interval: 0 must be >= 1"),
        ("checkpoint.keep_last=x", "checkpoint.keep_last: expected int, got str"),
        ("train.lr=true", "train.lr: expected float, got bool"),  # a bool is an int to Python, not a number to JSON
        ("optimizer.lr=1", "unknown section 'optimizer'"),
    ],
)
def test_bad_field_is_named(override, named):
    if named is None:
        load_config(REPO / "configs/tiny_unipool_cpu.json", [override])
        return
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs/tiny_unipool_cpu.json", [override])
    assert named in str(error.value)


@pytest.mark.parametrize("overrides, named", [
    (["moe.router=softmax", "moe.norm_router_c=3"], "moe.norm_router_c applies to moe.router='norm' only, not"
                                                    " 'softmax'"),
    (["moe.expert_ffn_hidden_size=64", "moe.granularity=0.5"], "moe.expert_ffn_hidden_size=64 and"
                                                               " moe.granularity=0.5 both set the expert width"),
    (["moe.kind=vanilla", "moe.aux_loss=layer", "moe.lock_start_step=5"], "moe.lock_* (UniPool-lock) needs"),
    (["moe.kind=vanilla", "moe.aux_loss=layer", "moe.pool_size=16"], "apply to moe.kind='unipool' only"),
])
def test_options_that_would_be_ignored_are_refused(overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(REPO / "configs/tiny_unipool_cpu.json", overrides)
    # a dense baseline ignores the whole moe section, as `--set moe.kind=dense` on an MoE config needs
    load_config(REPO / "configs/tiny_unipool_cpu.json", overrides + ["moe.kind=dense"])


@pytest.mark.parametrize("overrides, named", [
    (["data.train_prefix=a", "data.valid_prefix=b"], "are exclusive"),
    (["deepspeed.enabled=true", "train.precision=bf16"], "deepspeed.zero_stage=0 with train.precision='bf16'"),
    (["moe.lock_start_step=100", "moe.top_k=9"], "fewer than moe.top_k=9"),
    (["deepspeed.config_file=ds.json"], "deepspeed.config_file is set but deepspeed.enabled is false"),
    (["deepspeed.zero_stage=2"], "deepspeed.zero_stage=2 is set but deepspeed.enabled is false"),
    (["model.compile=true", "model.rope_kernel=triton"], "the compiled attention fuses RoPE itself"),
    (["model.compile=true", "model.swiglu_kernel=triton", "moe.kind=dense"], "the dense FFN layers are compiled"),
    (["model.compile=true", "model.swiglu_kernel=triton", "moe.moe_layer_interval=2"],
     "the dense FFN layers are compiled"),
    (["train.lr_decay=wsd"], "train.lr_decay='wsd' needs train.lr_cooldown_steps >= 1"),
    (["train.lr_cooldown_steps=10"], "train.lr_cooldown_steps=10 applies to train.lr_decay='wsd' only, not 'cosine'"),
    (["train.lr_decay=linear", "train.lr_cooldown_shape=minus_sqrt"],
     "train.lr_cooldown_shape='minus_sqrt' applies to train.lr_decay='wsd' only, not 'linear'"),
    (["train.lr_decay=wsd", "train.max_steps=100", "train.warmup_steps=20", "train.lr_cooldown_steps=81"],
     "train.warmup_steps=20 + train.lr_cooldown_steps=81 exceed train.max_steps=100: the cool-down would start"),
])
def test_contradictory_settings_are_named(overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(REPO / "configs/tiny_unipool_cpu.json", overrides)


def test_wsd_may_cool_down_right_after_its_warm_up():
    config = load_config(REPO / "configs/tiny_unipool_cpu.json", ["train.lr_decay=wsd", "train.max_steps=100",
                                                                  "train.warmup_steps=20", "train.lr_cooldown_steps=80"])
    assert (config.train.lr_decay, config.train.lr_cooldown_steps) == ("wsd", 80)


def test_compiled_blocks_take_the_triton_swiglu_where_only_experts_use_it():
    """Every layer an MoE layer: the Triton SwiGLU runs in the (eager) experts, never inside a compiled block."""
    config = load_config(REPO / "configs/tiny_unipool_cpu.json", ["model.compile=true", "model.swiglu_kernel=triton"])
    assert config.model.compile and config.model.swiglu_kernel == "triton"


def test_a_section_that_is_not_an_object_is_named(tmp_path):
    from megatron_unipool.config import apply_overrides

    (tmp_path / "c.json").write_text(json.dumps({"train": 5}))
    with pytest.raises(ConfigError, match="train: expected an object, got a number"):  # in JSON's words
        load_config(tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps({"model": None}))
    with pytest.raises(ConfigError, match="model: expected an object, got null"):
        load_config(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="train is not an object"):
        apply_overrides({"train": 5}, ["train.lr=1"])
    raw = {"train": {"lr": 1.0}}
    apply_overrides(raw, ["train.lr=2"])
    assert raw == {"train": {"lr": 1.0}}, "overrides changed the caller's dict"


@pytest.mark.parametrize("train, valid", [("data/c", "data/c"), ('{"data/a": 1, "data/c": 2}', "./data/c"),
                                          ("data/c", '{"data/x/../c": 1, "data/v": 1}'), ("link/c", "data/c"),
                                          ("~/c", "data/c")])
def test_validating_on_the_training_files_is_refused(train, valid, tmp_path, monkeypatch):
    """Compared as the files the paths name, however spelled; a checkpoint's config, whose run was started before
    this was checked so, still reads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    overrides = ["data.corpus=null", f"data.train_prefix={train}", f"data.valid_prefix={valid}"]
    with pytest.raises(ConfigError, match=rf"^data.train_prefix and data.valid_prefix both read {tmp_path}/data/c:"
                                          " validating on the training data"):
        load_config(REPO / "configs/tiny_unipool_cpu.json", overrides)
    stored = config_to_dict(load_config(REPO / "configs/tiny_unipool_cpu.json"))
    stored["data"].update(corpus=None, train_prefix=str(tmp_path / "data/c"), valid_prefix=str(tmp_path / "data/c"))
    assert config_from_dict(stored, world_size=None, stored=True).data.valid_prefix == str(tmp_path / "data/c")


def test_a_blend_is_an_object_of_prefixes_and_weights_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps({"data": {
        "corpus": None, "train_prefix": {"web": 7, "~/books": 0.25}, "valid_prefix": {"web_valid": 1}}}))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = load_config(tmp_path / "c.json").data
    assert data.train_prefix == {str(tmp_path / "web"): 7.0, str(tmp_path / "home/books"): 0.25}
    assert all(type(weight) is float for weight in data.train_prefix.values())
    assert data.valid_prefix == {str(tmp_path / "web_valid"): 1.0}
    override = load_config(tmp_path / "c.json", ['data.train_prefix={"a": 1, "b": 3}', "data.valid_prefix=v"]).data
    assert override.train_prefix == {str(tmp_path / "a"): 1.0, str(tmp_path / "b"): 3.0}
    assert override.valid_prefix == str(tmp_path / "v")
    stored = config_from_dict(config_to_dict(load_config(tmp_path / "c.json")), world_size=None, stored=True)
    assert stored.data == data  # a checkpoint's config reads back as it was written


@pytest.mark.parametrize("blend, named", [
    ('{"a": "x", "b": true, "c": 1e400}', r"data.train_prefix\['a'\]: expected a number, got a string 'x'\n"
                                          r"  data.train_prefix\['b'\]: expected a number, got a boolean True\n"
                                          r"  data.train_prefix\['c'\]: inf is not a finite number"),
    ('{"a": 1, "b": 0, "c": -2}', r"data.train_prefix: every weight of a blend must be > 0, got 'b': 0.0, 'c': -2.0"),
    ('{"a": 1, "b": 0}', r"data.train_prefix: every weight of a blend must be > 0, got 'b': 0.0$"),
    ("{}", "data.train_prefix is an empty blend"),
    ('{"a": 1, "./a": 2}', r"data.train_prefix names one file twice \('a' and './a'\): give it once, with the sum"),
    ('{"d/a": 1, "b": 1, "d/../d/a": 2}', r"names one file twice \('d/a' and 'd/../d/a'\)"),
    ('{"": 1}', r"data.train_prefix\[''\] is empty: give a path$"),
])
def test_a_bad_blend_is_named(tmp_path, monkeypatch, blend, named):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=named):
        load_config(REPO / "configs/tiny_unipool_cpu.json",
                    ["data.corpus=null", f"data.train_prefix={blend}", "data.valid_prefix=v"])
    (tmp_path / "c.json").write_text('{"data": {"corpus": null, "train_prefix": [["a", 1]], "valid_prefix": "v"}}')
    with pytest.raises(ConfigError, match=r"data.train_prefix: expected str or object or null, got list"):
        load_config(tmp_path / "c.json")
    with pytest.raises(ConfigError, match=r"data.train_prefix: expected str or object or null, got list \[0.3, 'a'"):
        load_config(REPO / "configs/tiny_unipool_cpu.json",  # Megatron's --data-path written as a JSON list
                    ["data.corpus=null", 'data.train_prefix=[0.3, "a", 0.7, "b"]', "data.valid_prefix=v"])


@pytest.mark.parametrize("data", [[], ["data.corpus=null", "data.train_prefix=t", "data.valid_prefix=v"],
                                  ["data.corpus=null", "data.train_prefix=t", 'data.valid_prefix={"v": 1}']])
def test_valid_per_file_needs_a_validation_blend_of_several_files(tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data.valid_per_file evaluates each file of a blend in data.valid_prefix on"
                                          r" its own: give data.valid_prefix as \{prefix: weight, ...\} of several"):
        load_config(REPO / "configs/tiny_unipool_cpu.json", [*data, "data.valid_per_file=true"])
    blend = load_config(REPO / "configs/tiny_unipool_cpu.json", ["data.corpus=null", "data.train_prefix=t",
                                                                'data.valid_prefix={"v": 1, "w": 2}', "data.valid_per_file=true"])
    assert blend.data.valid_per_file and len(blend.data.valid_prefix) == 2


@pytest.mark.parametrize(
    "world, overrides, named",
    [
        (8, ["parallel.tp=8"], "model.num_heads=4 must be divisible by parallel.tp=8"),
        (8, ["parallel.pp=8"], "model.num_layers=4 must be divisible by parallel.pp=8"),
        (6, ["parallel.tp=4"], "world size 6 must be divisible by parallel.tp=4 x parallel.pp=1"),
        (8, ["parallel.ep=16"], "parallel.ep=16 must divide the data-parallel size 8"),
        (4, ["parallel.pp=2", "deepspeed.enabled=true", "deepspeed.zero_stage=2"], "deepspeed.zero_stage=2 needs parallel.pp=1"),
        (4, ["moe.pool_size=30", "parallel.ep=4"], "30 experts per pool must be divisible by parallel.ep=4"),
        (2, ["moe.pool_aux_lag=micro_batch"], "moe.pool_aux_lag='micro_batch' needs one data-parallel rank, not 2"),
        (4, ["moe.pool_aux_lag=micro_batch", "parallel.tp=2"],
         "moe.pool_aux_lag='micro_batch' needs one data-parallel rank, not 2"),
        (6, ["parallel.pp=4"], "world size 6 must be divisible by parallel.tp=1 x parallel.pp=4"),
        (4, ["parallel.tp=4"], "model.num_kv_heads=2 must be divisible by parallel.tp=4"),
        (2, ["parallel.tp=2", "model.vocab_size=321"], "model.vocab_size=321 must be divisible by parallel.tp=2"),
        (2, ["parallel.tp=2", "moe.shared_expert_ffn_hidden_size=65"],
         "moe.shared_expert_ffn_hidden_size=65 must be divisible"),
        (2, ["parallel.pp=2", "model.tie_embeddings=true"], "model.tie_embeddings needs parallel.pp=1"),
        (2, ["model.num_layers=6", "parallel.pp=2", "moe.layers_per_pool=2", "deepspeed.enabled=true",
             "deepspeed.zero_stage=1"], "needs the pools of every stage"),
        # a multiple of micro_batch (16 = 4 x 4) that 8 data-parallel ranks cannot split into whole micro-batches
        (8, [], "train.global_batch=16 must be a multiple of train.micro_batch=4 x data-parallel size 8"),
    ],
)
def test_sizes_inconsistent_with_the_layout_are_named(world, overrides, named):
    """What only the launch reveals: the degrees against the world size and the model's sizes."""
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs/tiny_unipool_cpu.json", overrides, world_size=world)
    assert named in str(error.value)


def test_only_the_ffns_tensor_parallelism_splits_must_divide_by_tp():
    """Routed experts are whole on each tensor-parallel rank: a model whose every FFN is MoE takes
    an odd dense width; a dense layer (here the dense baseline) is split and refuses it."""
    overrides = ["parallel.tp=2", "model.ffn_hidden_size=257"]
    load_config(REPO / "configs/tiny_unipool_cpu.json", overrides, world_size=2)
    with pytest.raises(ConfigError, match="model.ffn_hidden_size=257 must be divisible by parallel.tp=2"):
        load_config(REPO / "configs/tiny_unipool_cpu.json", overrides + ["moe.kind=dense"], world_size=2)


def test_data_parallel_size_is_the_world_over_tp_times_pp():
    from megatron_unipool.config import ParallelConfig

    assert ParallelConfig(tp=2, pp=2, ep=2).data_parallel(16) == 4
    assert ParallelConfig(tp=2, pp=1).data_parallel(8) == 4 and ParallelConfig(tp=1, pp=4).data_parallel(8) == 2


@pytest.mark.parametrize("granularity, width", [(0.5, 64), (0.7, 90), (0.3, 38), (0.001, 1)])
def test_granularity_rounds_the_expert_width_to_the_nearest_integer(granularity, width):
    """expert width = granularity x dense FFN width (128 here), rounded to nearest (89.6 -> 90), at least 1."""
    config = load_config(REPO / "configs/tiny_unipool_cpu.json", [f"moe.granularity={granularity}",
                                                                  "model.ffn_hidden_size=128"])
    assert config.moe.expert_width(config.model.ffn_hidden_size) == width


def test_all_problems_reported_together(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"moe": {"kind": "x", "top_k": "two"}, "train": {"nope": 1}}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "moe.kind" in message and "moe.top_k" in message and "unknown key train.nope" in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match=r"config file \S+ is a directory$"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # a run directory, as the tools write one
    with pytest.raises(ConfigError, match=rf"config file {tmp_path} is a directory: pass {tmp_path / 'config.json'}$"):
        load_config(tmp_path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["max_steps=3"])


def test_a_key_given_twice_is_refused_not_merged(tmp_path):
    """json keeps the last of two equal keys: a second "moe" object would silently replace the first."""
    path = tmp_path / "twice.json"
    path.write_text('{"moe": {"kind": "vanilla", "aux_loss": "layer"}, "train": {"lr": 0.1}, "moe": {"top_k": 2}}')
    with pytest.raises(ConfigError, match=r"twice\.json is not valid JSON: 'moe' given more than once"):
        load_config(path)
    path.write_text('{"train": {"lr": 0.1, "max_steps": 5, "lr": 0.001}}')
    with pytest.raises(ConfigError, match=r"'lr' given more than once in one object \(in the object with keys 'lr',"
                                          r" 'max_steps'\)"):
        load_config(path)


@pytest.mark.parametrize("override, field, value", [
    ("train.lr=.001", "lr", 0.001), ("train.lr=5.", "lr", 5.0), ("train.lr=+0.002", "lr", 0.002),
    ("train.max_steps=020", "max_steps", 20),
])
def test_overrides_take_numbers_written_the_python_way(override, field, value):
    config = load_config(REPO / "configs/tiny_unipool_cpu.json", [override])
    assert getattr(config.train, field) == value and type(getattr(config.train, field)) is type(value)


def test_a_string_field_takes_an_override_as_written():
    config = load_config(REPO / "configs/tiny_unipool_cpu.json", ["data.cache_dir=2024", "checkpoint.load= 1e3"])
    assert Path(config.data.cache_dir).name == "2024" and Path(config.checkpoint.load).name == "1e3"
    assert load_config(REPO / "configs/tiny_unipool_cpu.json", ["checkpoint.load=null"]).checkpoint.load is None
    # the value is everything after the first '=': a sweep's directory names hold more
    assert Path(load_config(REPO / "configs/tiny_unipool_cpu.json", ["checkpoint.load=runs/lr=0.1"]).checkpoint.load
                ).name == "lr=0.1"
    with pytest.raises(ConfigError, match="train.lr: expected float, got str '1e-3x'"):
        load_config(REPO / "configs/tiny_unipool_cpu.json", ["train.lr=1e-3x"])


def test_relative_paths_mean_the_directory_the_command_runs_in(tmp_path, monkeypatch):
    """Stored absolute in the run's checkpoints: the analysis tools, started elsewhere, read the same
    files (a relative data_cache tokenised the corpus again wherever they ran)."""
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "configs/tiny_unipool_cpu.json",
                         ["data.corpus=null", "data.train_prefix=data/my_train", "data.valid_prefix=data/my_valid",
                          "data.tokenizer=tok/tokenizer.json", "checkpoint.load=../start"])
    assert config.data.train_prefix == str(tmp_path / "data/my_train")
    assert config.data.valid_prefix == str(tmp_path / "data/my_valid")
    assert config.data.cache_dir == str(tmp_path / "data_cache")  # the tiny config's relative default
    assert config.data.tokenizer == str(tmp_path / "tok/tokenizer.json")
    assert config.checkpoint.load == str(tmp_path / ".." / "start")
    assert load_config(REPO / "configs/tiny_unipool_cpu.json", ["data.tokenizer=gpt2"]).data.tokenizer == "gpt2"


def test_overrides_are_typed_like_the_file():
    config = load_config(REPO / "configs/tiny_unipool_cpu.json",
                         ["train.max_steps=7", "moe.router=softmax", "train.lr=1", "moe.capacity_factor=1.25"])
    assert config.train.max_steps == 7 and config.moe.router == "softmax"
    assert isinstance(config.train.lr, float) and config.train.lr == 1.0
    assert config.moe.capacity_factor == 1.25


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path):
    config = load_config(path, world_size=None)
    expected_kind = path.stem.split("_")[0] if not path.stem.startswith("tiny") else path.stem.split("_")[1]
    assert config.moe.kind == expected_kind
    if "_pool" in path.stem:
        assert config.moe.pool_size == int(path.stem.rsplit("pool", 1)[1])
    # the paper scales are laid out for 8-GPU nodes (one node, or two with the same ep); the tiny ones
    # divide by tp, pp and ep of 2 on 4 processes
    worlds = [4] if path.stem.startswith("tiny") else [8, 16]
    for world in worlds:
        load_config(path, world_size=world)
    if path.stem.startswith("tiny"):
        for layout in (["parallel.tp=2", "parallel.pp=2"], ["parallel.ep=2"], ["parallel.pp=2", "parallel.ep=2"]):
            load_config(path, layout, world_size=4)


def test_tiny_twins_have_equal_active_parameters():
    budgets = {kind: param_budget(c.model, c.moe) for kind in ("dense", "vanilla", "unipool")
               for c in [load_config(REPO / f"configs/tiny_{kind}_cpu.json")]}
    dense = budgets["dense"].active_params
    for kind in ("vanilla", "unipool"):  # MoE adds only the routers to the active path
        assert abs(budgets[kind].active_params - dense) / dense < 0.02
    assert budgets["vanilla"].expert_params == budgets["unipool"].expert_params


@pytest.mark.parametrize("overrides", [[], ["moe.kind=dense"], ["moe.pool_size=16", "moe.top_k=2"],
                                       ["moe.kind=vanilla", "moe.aux_loss=layer", "model.tie_embeddings=true"],
                                       ["moe.shared_expert_ffn_hidden_size=64", "moe.moe_layer_interval=2"]])
def test_param_budget_counts_the_built_model(overrides):
    """Parameters, active parameters, the vanilla expert budget and the training FLOPs per token (which
    TFLOP/s and MFU divide by) against the built model: its parameters, and the FLOPs a counter sees in
    one forward (x3 for forward and backward; attention through SDPA's math path, whose score and value
    matmuls the counter sees, over the full sequence as the PaLM convention counts them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = load_config(REPO / "configs/tiny_unipool_cpu.json", overrides + ["model.seq_len=32",
                                                                              "model.expert_gemm=loop"])
    model = LanguageModel(config.model, config.moe)
    budget = param_budget(config.model, config.moe)
    assert budget.total_params == sum(p.numel() for p in model.parameters())
    # active = everything except the experts a token does not visit
    pools = config.moe.pool_layout(config.model.num_layers)
    per_expert = sum(p[0].numel() for pool in model.expert_pools for p in pool.parameters()) // max(1, len(pools))
    unvisited = sum(p.numel() for p in model.expert_pools.parameters()) - len(config.moe.moe_layers(config.model.num_layers)) * config.moe.top_k * per_expert
    assert budget.active_params == budget.total_params - unvisited
    vanilla = dataclasses.replace(config.moe, kind="vanilla", pool_size=None, layers_per_pool=None)
    if config.moe.kind != "dense":  # the per-layer MoE twin holds the budget the pool is measured against
        assert budget.vanilla_expert_params == sum(p.numel() for p in LanguageModel(config.model, vanilla).expert_pools.parameters())
    tokens = torch.randint(0, config.model.vocab_size, (2, config.model.seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.eval()(tokens)
    assert 3 * counter.get_total_flops() / tokens.numel() == budget.train_flops_per_token


def test_param_budget_tool_reproduces_the_paper_figure():
    """UniPool-182M has 777.9M parameters in the paper (GPT-2 vocabulary padded to 51,200)."""
    out = subprocess.run([sys.executable, str(REPO / "tools/param_budget.py"), "--config",
                          str(REPO / "configs/unipool_182m.json"), "--json"], capture_output=True, text=True, check=True)
    budget = json.loads(out.stdout)
    assert round(budget["total_params"] / 1e6, 1) == 777.9
    reduced = param_budget(*(lambda c: (c.model, c.moe))(load_config(REPO / "configs/unipool_182m_pool48.json", world_size=None)))
    assert reduced.expert_budget_percent == pytest.approx(50.0)


def test_cli_reports_config_errors_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "launch/pretrain.py"), "--run-dir", str(tmp_path),
                          "--set", "moe.top_k=99"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "moe.top_k=99 exceeds" in out.stderr
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("text, named", [
    ('{"train": {"lr": NaN}}', "train.lr: nan is not a finite number"),
    ('{"model": {"rope_base": Infinity}}', "model.rope_base: inf is not a finite number"),
    ('{"train": {"grad_clip": -Infinity}}', "train.grad_clip: -inf is not a finite number"),
    ('{"moe": {"capacity_factor": NaN}}', "moe.capacity_factor: nan is not a finite number"),
    ('{"train": {"lr": 1' + "0" * 400 + '}}', "train.lr: integer too large for a float"),
])
def test_non_finite_and_overflowing_numbers_are_named(tmp_path, text, named):
    """Python's json accepts NaN and +-Infinity, which pass every range check (NaN compares false)."""
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert named in str(error.value)
    section, key = named.split(":")[0].split(".")
    value = text.split(": ", 2)[2].rstrip("}")
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"{section}.{key}={value}"])
    assert named in str(error.value)


def test_a_config_file_with_a_byte_order_mark_loads_and_one_of_another_shape_is_named(tmp_path):
    marked = tmp_path / "marked.json"
    marked.write_bytes(b"\xef\xbb\xbf" + b'{"train": {"lr": 0.5}}')
    assert load_config(marked).train.lr == 0.5
    for text, kind in (("[]", "an array"), ("null", "null"), ("3", "a number"), ('"x"', "a string"), ("true", "a boolean")):
        listed = tmp_path / "listed.json"
        listed.write_text(text)
        with pytest.raises(ConfigError, match=rf"^config file \S+listed\.json must hold a JSON object of sections, not {kind}$"):
            load_config(listed)


def test_unreadable_and_non_utf8_config_files_are_named(tmp_path, monkeypatch):
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"data": {"tokenizer": "caf\u00e9"}}'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config file .*latin1\.json is not UTF-8 text"):
        load_config(latin1)
    locked = tmp_path / "locked.json"
    locked.write_text("{}")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"config file .*locked\.json cannot be read: Permission denied"):
        load_config(locked)


def test_deepspeed_config_file_is_checked_at_load_time(tmp_path):
    from megatron_unipool.config.ds_config import deepspeed_config

    enabled = ["deepspeed.enabled=true"]
    with pytest.raises(ConfigError, match=r"deepspeed.config_file .*absent\.json does not exist"):
        load_config(None, enabled + [f"deepspeed.config_file={tmp_path / 'absent.json'}"])
    broken = tmp_path / "ds.json"
    broken.write_text('{"communication_data_type": ')
    with pytest.raises(ConfigError, match=r"deepspeed.config_file .*ds\.json is not valid JSON"):
        load_config(None, enabled + [f"deepspeed.config_file={broken}"])
    broken.write_text('["not", "an", "object"]')
    with pytest.raises(ConfigError, match=r"ds\.json must hold a JSON object, got list"):
        load_config(None, enabled + [f"deepspeed.config_file={broken}"])
    broken.write_text('{"zero_optimization": 1}')
    with pytest.raises(ConfigError, match=r"ds\.json: zero_optimization must be an object"):
        load_config(None, enabled + [f"deepspeed.config_file={broken}"])
    broken.write_text('{"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5, "x": 1}')
    config = load_config(None, enabled + [f"deepspeed.config_file={broken}"])
    merged = deepspeed_config(config, micro_batches=1)
    assert merged["zero_optimization"] == {"reduce_bucket_size": 1000, "stage": 0, "compute_grad_norm": True}
    assert merged["x"] == 1
    broken.write_text('{"bfloat16": {"immediate_grad_update": true}}')  # the old name's options reach bf16
    merged = deepspeed_config(load_config(None, enabled + [f"deepspeed.config_file={broken}"]), micro_batches=1)
    assert merged["bf16"] == {"enabled": False, "check_grad_overflow": True, "immediate_grad_update": True}
    assert "bfloat16" not in merged
    broken.write_text("{")  # changed after loading: the engine's read names it too
    with pytest.raises(ConfigError, match=r"deepspeed.config_file .*ds\.json is not valid JSON"):
        deepspeed_config(config, micro_batches=1)


def test_generated_deepspeed_config_follows_precision_and_clips_once():
    """fp32 runs get bf16 off; at ZeRO-0 our backend clips (DeepSpeed's clipping is off, or the
    gradients would be clipped twice); at ZeRO 1-2 DeepSpeed clips at train.grad_clip."""
    from megatron_unipool.config.ds_config import deepspeed_config

    fp32 = load_config(REPO / "configs/tiny_unipool_cpu.json", ["deepspeed.enabled=true", "deepspeed.zero_stage=0"])
    generated = deepspeed_config(fp32, micro_batches=1)
    assert generated["gradient_clipping"] == 0.0 and generated["bf16"] == {"enabled": False, "check_grad_overflow": True}
    assert generated["zero_optimization"] == {"stage": 0, "compute_grad_norm": True}
    zero1 = load_config(REPO / "configs/tiny_unipool_cpu.json", ["deepspeed.enabled=true", "deepspeed.zero_stage=1",
                                                                 "train.grad_clip=0.5"])  # not DeepSpeed's 1.0
    assert deepspeed_config(zero1, micro_batches=1)["gradient_clipping"] == 0.5


@pytest.mark.parametrize("content, precision, named", [
    ({"bf16": {"enabled": True}}, "fp32", "bf16.enabled"),
    ({"bf16": {"enabled": 1}}, "bf16", "bf16.enabled"),  # 1 is not true to DeepSpeed's schema
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}}, "fp32", "optimizer.params.betas"),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 0.95}}}, "fp32", "optimizer.params.eps"),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-8}}}, "fp32", None),  # train.adam_eps: agrees
    ({"gradient_clipping": 0.5}, "fp32", "remove gradient_clipping (set train.grad_clip)"),  # the config's is 1.0
    ({"gradient_clipping": 1.0}, "fp32", None),
    # DeepSpeed's old name for bf16 was read only without bf16, which ours always sets: ignored
    ({"bfloat16": {"enabled": True}}, "fp32", "bf16.enabled"),
    ({"bfloat16": {"enabled": True}, "bf16": {"enabled": True}}, "bf16", "sets both bf16 and its old name bfloat16"),
    # a GradScaler the trainer's clipping would run before: a 65536x gradient norm, updates clipped to 1/65536
    ({"torch_autocast": {"enabled": True, "dtype": "torch.float16"}}, "fp32", "torch_autocast.enabled"),
    # without them DeepSpeed applied a step with a NaN loss, counted as a healthy one
    ({"bf16": {"check_grad_overflow": False}}, "bf16", "bf16.check_grad_overflow (the trainer skips steps"),
    ({"zero_optimization": {"compute_grad_norm": False}}, "fp32", "zero_optimization.compute_grad_norm (the trainer"),
    ({"bf16": {"check_grad_overflow": True, "immediate_grad_update": True}}, "bf16", None),
    # Hugging Face style files carry these; the trainer generates the same values
    ({"zero_allow_untested_optimizer": True, "managed_gradient_accumulation": True}, "fp32", None),
    ({"managed_gradient_accumulation": False}, "fp32", "managed_gradient_accumulation (set by the trainer"),
    # DeepSpeed refuses ZeRO-Offload with a client optimizer, at deepspeed.initialize: a traceback, not a config error
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}, "fp32",
     "sets zero_optimization.offload_optimizer: ZeRO-Offload needs DeepSpeed's CPU Adam"),
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "none"}, "offload_param": None}}, "fp32", None),
])
def test_deepspeed_config_file_values_are_compared_with_the_run(tmp_path, content, precision, named):
    (tmp_path / "ds.json").write_text(json.dumps(content))
    overrides = ["deepspeed.enabled=true", "deepspeed.zero_stage=1", f"deepspeed.config_file={tmp_path / 'ds.json'}",
                 f"train.precision={precision}"]
    if named is None:
        load_config(REPO / "configs/tiny_unipool_cpu.json", overrides)
        return
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(REPO / "configs/tiny_unipool_cpu.json", overrides)


def test_a_deepspeed_files_gradient_clipping_is_compared_with_train_grad_clip(tmp_path):
    """The file's 1.0 (DeepSpeed's usual value) against a run clipping at 0.5: refused, not the run's value ignored."""
    overrides = ["deepspeed.enabled=true", "deepspeed.zero_stage=1", f"deepspeed.config_file={tmp_path / 'ds.json'}",
                 "train.grad_clip=0.5"]
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_clipping": 1.0}))
    with pytest.raises(ConfigError, match=re.escape("remove gradient_clipping (set train.grad_clip)")):
        load_config(REPO / "configs/tiny_unipool_cpu.json", overrides)
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_clipping": 0.5}))
    load_config(REPO / "configs/tiny_unipool_cpu.json", overrides)


def test_a_checkpoints_config_may_hold_a_zero_stage_its_run_ignored():
    """Runs saved before zero_stage without deepspeed.enabled was refused still open in the tools (which read
    a checkpoint's config as stored); a run is refused it, and so is a config a tool checks or writes for any
    world size (the written run could never start)."""
    raw = config_to_dict(load_config(REPO / "configs/tiny_unipool_cpu.json"))
    raw["deepspeed"]["zero_stage"] = 1
    assert config_from_dict(raw, world_size=None, stored=True).deepspeed.zero_stage == 1
    for world_size in (1, None):
        with pytest.raises(ConfigError, match="deepspeed.zero_stage=1 is set but deepspeed.enabled is false"):
            config_from_dict(raw, world_size=world_size)


def test_home_is_expanded_in_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text("{}")
    config = load_config(REPO / "configs/tiny_unipool_cpu.json",
                         ["data.cache_dir=~/cache", "deepspeed.enabled=true", "deepspeed.zero_stage=1",
                          "deepspeed.config_file=ds.json"])
    assert config.data.cache_dir == str(tmp_path / "home" / "cache")
    assert config.deepspeed.config_file == str(tmp_path / "ds.json")  # relative: to where the command runs
    # the home of no known user: a config error naming the field, not a traceback from expanduser
    with pytest.raises(ConfigError, match=r"data.cache_dir='~nosuchuser_x9/cache': Could not determine home"):
        load_config(REPO / "configs/tiny_unipool_cpu.json", ["data.cache_dir=~nosuchuser_x9/cache"])
    # not the working directory; the error offers only what the field accepts instead of a path
    for field, instead in (("checkpoint.load", "null"), ("data.tokenizer", "byte"), ("data.cache_dir", None)):
        offered = rf", or .*\b{instead}\b.*$" if instead else "$"
        with pytest.raises(ConfigError, match=rf"{field} is empty: give a path{offered}"):
            load_config(REPO / "configs/tiny_unipool_cpu.json", [f"{field}="])
        if instead:
            load_config(REPO / "configs/tiny_unipool_cpu.json", [f"{field}={instead}"])


def test_param_budget_tool_honours_set_names_its_config_and_refuses_bad_ones(capsys):
    """--set reaches the budget (a 48-expert pool is 50% of vanilla's), the JSON names the config, the
    table's rows are the budget's, and a bad config is one error line with exit status 2."""
    from script_modules import load_script

    tool = load_script(REPO / "tools" / "param_budget.py")
    config = str(REPO / "configs/unipool_182m.json")
    assert tool.main(["--config", config, "--set", "moe.pool_size=48", "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)
    assert budget["config"] == config and budget["expert_budget_percent"] == pytest.approx(50.0)
    assert tool.main(["--config", config]) == 0
    table = capsys.readouterr().out
    full = param_budget(*(lambda c: (c.model, c.moe))(load_config(config, world_size=None))).as_dict()
    rows = dict(re.split(r" {2,}", line.strip(), maxsplit=1) for line in table.splitlines()[1:])
    assert rows == {
        "total parameters": f"{full['total_params']:,} ({full['total_params'] / 1e6:.1f}M)",
        "active parameters per token": f"{full['active_params']:,} ({full['active_params'] / 1e6:.1f}M)",
        "embedding parameters": f"{full['embedding_params']:,}",
        "expert parameters": f"{full['expert_params']:,} in 1 pool(s) of 96 experts",
        "vanilla expert budget": f"{full['vanilla_expert_params']:,}",
        "experts as % of vanilla": "100.0%",
        "training FLOPs per token": f"{full['train_flops_per_token']:.4g}",
    }
    assert tool.main(["--config", config, "--set", "moe.top_k=99"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("zero, named", [
    ('{"offload_optimizer": "cpu"}', r"zero_optimization.offload_optimizer must be an object"),
    ('{"cpu_offload": true}', r"sets zero_optimization.cpu_offload: ZeRO-Offload"),
    ('{"cpu_offload_param": true}', r"sets zero_optimization.cpu_offload_param: ZeRO-Offload"),
])
def test_offload_in_any_spelling_is_refused_at_load(tmp_path, zero, named):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": ' + zero + "}")
    with pytest.raises(ConfigError, match=named):
        load_config(None, ["deepspeed.enabled=true", "deepspeed.zero_stage=1", f"deepspeed.config_file={ds}"])
    ds.write_text('{"zero_optimization": {"cpu_offload": false, "offload_optimizer": null}}')  # no offload
    load_config(None, ["deepspeed.enabled=true", "deepspeed.zero_stage=1", f"deepspeed.config_file={ds}"])


def test_cli_names_a_config_path_that_cannot_be_looked_at(tmp_path):
    too_long = str(tmp_path / ("a" * 300 + ".json"))  # ENAMETOOLONG from stat, as EACCES on a parent would be
    for args in (["--config", too_long], ["--set", "deepspeed.enabled=true", "--set", f"deepspeed.config_file={too_long}"]):
        out = subprocess.run([sys.executable, str(REPO / "launch/pretrain.py"), "--run-dir", str(tmp_path / "run"),
                              *args], capture_output=True, text=True)
        assert out.returncode == 2, out.stderr
        assert "cannot be read: File name too long" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, str(REPO / "launch/pretrain.py"), "--run-dir", too_long[:-5]],
                         capture_output=True, text=True)  # the handler's own is_file raised the same error again
    assert out.returncode == 2 and out.stderr.startswith(f"error: run directory {too_long[:-5]} cannot be used:"
                                                         " File name too long"), out.stderr[-2000:]
