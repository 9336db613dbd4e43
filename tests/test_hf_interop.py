"""Hugging Face interop: exports compute our logits in transformers, imports compute the HF model's,
refusals name what cannot be expressed, and the CLI chains Llama -> ours -> upcycled MoE -> Mixtral."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the interop tests load exports with transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from megatron_unipool.config import MoEConfig, config_to_dict  # noqa: E402
from megatron_unipool.model import LanguageModel  # noqa: E402
from megatron_unipool.model.hf_format import from_hf_llama, to_hf  # noqa: E402
from megatron_unipool.training import latest_checkpoint, save_checkpoint  # noqa: E402
from megatron_unipool.training.checkpoint import load_trained_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_checkpoint.py"
SMALL = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_len=32", "model.rope_base=50000",
         "model.norm_eps=0.01", "moe.num_experts=4"]  # rope and eps unlike any default: a dropped field shows
SOFTMAX = ["moe.router=softmax", "moe.top_k=2"]

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")]  # Qwen2-MoE zero-wide shared expert


def randomise_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of unit-scale activations, norms away from 1 and routers that prefer experts clearly:
    a wrong mapping or gate changes the logits far beyond the tolerance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() == 1:
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5 * (3 if "router" in name else 1))
    return module.eval()


def tokens(vocab_size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))


def our_logits(model: LanguageModel, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch)[0]


def hf_logits(directory: Path, batch: torch.Tensor, **config_changes) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                    output_loading_info=True, **config_changes)
    assert not any(info.values()), info  # nothing missing, unexpected or re-initialised
    with torch.no_grad():
        return model.eval()(batch).logits


def write_hf(directory: Path, config: dict, tensors: dict) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def hard_lock_(model: LanguageModel) -> None:
    """After a hard UniPool-lock: pool expert e belongs to layer e % layers, the others are masked out."""
    lock = model.pool_locks[0]
    layers, experts = lock.offset.shape
    owner = torch.arange(experts) % layers
    lock.offset.copy_(torch.where(owner == torch.arange(layers).unsqueeze(1), 0.0, -torch.inf))


EXPORTS = {
    "dense": ("dense", [], "LlamaForCausalLM", None),
    "dense_tied": ("dense", ["model.tie_embeddings=true"], "LlamaForCausalLM", None),
    "vanilla_topk_softmax": ("vanilla", SOFTMAX + ["moe.softmax_before_topk=false"], "MixtralForCausalLM", None),
    "vanilla_raw_probabilities": ("vanilla", SOFTMAX, "Qwen2MoeForCausalLM", None),
    "vanilla_raw_top1": ("vanilla", SOFTMAX + ["moe.top_k=1"], "Qwen2MoeForCausalLM", None),
    # experts half the dense FFN's width: each architecture's expert width is its own field
    "vanilla_fine_grained_topk_softmax": ("vanilla", SOFTMAX + ["moe.softmax_before_topk=false", "moe.granularity=0.5"],
                                          "MixtralForCausalLM", None),
    "vanilla_fine_grained_raw_probabilities": ("vanilla", SOFTMAX + ["moe.granularity=0.5"], "Qwen2MoeForCausalLM", None),
    "unipool_renormalised": ("unipool", SOFTMAX + ["moe.normalize_gates=true", "moe.bias_balancing=true"],
                             "MixtralForCausalLM", lambda m: [layer.router.expert_bias.fill_(0.3) for layer in m.moe_layers()]),
    "unipool_dense_layers_between": ("unipool", SOFTMAX + ["moe.normalize_gates=true", "moe.moe_layer_interval=2"],
                                     "Qwen2MoeForCausalLM", None),
    "unipool_hard_lock": ("unipool", SOFTMAX + ["moe.softmax_before_topk=false", "moe.lock_start_step=1",
                                                "moe.lock_window_steps=1"], "MixtralForCausalLM", hard_lock_),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_transformers_with_the_same_logits(tiny_config, tmp_path, case):
    kind, overrides, architecture, prepare = EXPORTS[case]
    config = tiny_config(f"configs/tiny_{kind}_cpu.json", *SMALL, *overrides)
    model = randomise_(LanguageModel(config.model, config.moe))
    if prepare is not None:
        with torch.no_grad():
            prepare(model)
    hf_config, tensors = to_hf(config.model, config.moe, model.state_dict())
    assert hf_config["architectures"] == [architecture]
    batch = tokens(config.model.vocab_size)
    expected = our_logits(model, batch)
    torch.testing.assert_close(hf_logits(write_hf(tmp_path / "hf", hf_config, tensors), batch), expected,
                               atol=1e-4, rtol=1e-4)
    if case == "unipool_hard_lock":  # each layer keeps only its own quarter of the 16-expert pool
        assert hf_config["num_local_experts"] == 4
    assert hf_config["max_position_embeddings"] == config.model.seq_len
    # transformers 5 reads rope_parameters, 4 the top-level rope_theta (interop.md): both written
    assert hf_config["rope_theta"] == hf_config["rope_parameters"]["rope_theta"] == config.model.rope_base
    # fresh tensors: safetensors refuses tensors sharing memory, and the export must not alias the model
    pointers = [t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()]
    own = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert len(set(pointers)) == len(pointers) and not own & set(pointers)


def test_a_document_masked_model_exports_with_a_note_and_the_same_logits_on_one_document(tiny_config, tmp_path,
                                                                                          convert_tool, capsys):
    from megatron_unipool.training.checkpoint import write_run_directory

    config = tiny_config("configs/tiny_dense_cpu.json", *SMALL, "model.document_masking=true")
    model = randomise_(LanguageModel(config.model, config.moe))
    write_run_directory(tmp_path / "run", config, model.state_dict(), {}, {"consumed_samples": 0})
    assert convert_tool.main(["--to", "hf", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    assert "note: trained with model.document_masking: on one document" in capsys.readouterr().out
    batch = tokens(config.model.vocab_size)
    with torch.no_grad():  # an EOD id the rows do not hold: each row is one document, masked as the model trained
        expected = model.eval()(batch, model.documents_of(batch, eod_id=-1))[0]
    torch.testing.assert_close(hf_logits(tmp_path / "hf", batch), expected, atol=1e-4, rtol=1e-4)


def test_gate_normalisation_changes_the_logits(tiny_config, tmp_path):
    """The architecture choice matters: the same export read with renormalised gates is another model."""
    config = tiny_config("configs/tiny_vanilla_cpu.json", *SMALL, *SOFTMAX)
    model = randomise_(LanguageModel(config.model, config.moe))
    directory = write_hf(tmp_path / "hf", *to_hf(config.model, config.moe, model.state_dict()))
    batch = tokens(config.model.vocab_size)
    renormalised = hf_logits(directory, batch, norm_topk_prob=True)
    assert (renormalised - our_logits(model, batch)).abs().max() > 1e-2


REFUSALS = {
    "norm_router": ("unipool", ["moe.router=norm"], None, "NormRouter gates are scale"),
    "sigmoid_router": ("vanilla", ["moe.router=sigmoid"], None, "sigmoid gates are not a softmax"),
    "shared_expert": ("vanilla", SOFTMAX + ["moe.shared_expert_ffn_hidden_size=32"], None, "added ungated"),
    "capacity": ("vanilla", SOFTMAX + ["moe.capacity_factor=1.25"], None, "capacity drops tokens"),
    "selection_bias": ("vanilla", SOFTMAX + ["moe.bias_balancing=true"],
                       lambda m: m.moe_layers()[1].router.expert_bias.copy_(torch.tensor([0.0, 0.1, 0.0, 0.0])),
                       "layer 1: moe.bias_balancing's expert_bias differs between experts"),
    "annealing_lock": ("unipool", SOFTMAX + ["moe.lock_start_step=1", "moe.lock_window_steps=1"],
                       lambda m: m.pool_locks[0].offset[:, :3].fill_(-2.5), "UniPool-lock is annealing"),
    # 6 experts over 4 layers: two layers own 2, two own 1; Hugging Face has one expert count for all
    "uneven_hard_lock": ("unipool", SOFTMAX + ["moe.top_k=1", "moe.pool_size=6", "moe.lock_start_step=1",
                                               "moe.lock_window_steps=1"], hard_lock_, r"route to \[1, 2\] experts"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_inexpressible_models_are_refused_naming_why(tiny_config, case):
    kind, overrides, prepare, message = REFUSALS[case]
    config = tiny_config(f"configs/tiny_{kind}_cpu.json", *SMALL, *overrides)
    model = LanguageModel(config.model, config.moe)
    if prepare is not None:
        with torch.no_grad():
            prepare(model)
    with pytest.raises(ValueError, match=message):
        to_hf(config.model, config.moe, model.state_dict())


def test_every_reason_is_reported_at_once(tiny_config):
    config = tiny_config("configs/tiny_unipool_cpu.json", *SMALL, "moe.capacity_factor=2.0")
    with pytest.raises(ValueError, match=r"(?s)NormRouter.*capacity_factor=2.0"):
        to_hf(config.model, config.moe, LanguageModel(config.model, config.moe).state_dict())


def llama_config(tie: bool = False) -> "transformers.LlamaConfig":
    return transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    rms_norm_eps=0.01, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                                    tie_word_embeddings=tie)


def tiny_llama(tie: bool = False) -> "transformers.LlamaForCausalLM":
    return randomise_(transformers.LlamaForCausalLM(llama_config(tie)), seed=5)


def test_tied_llama_imports_with_the_same_logits(tmp_path):
    llama = tiny_llama(tie=True)
    llama.save_pretrained(tmp_path)
    config, state = from_hf_llama(json.loads((tmp_path / "config.json").read_text()),
                                  load_file(tmp_path / "model.safetensors"))
    assert config.tie_embeddings and config.rope_base == 50000.0 and config.num_kv_heads == 2
    ours = LanguageModel(config, MoEConfig(kind="dense"))
    ours.load_state_dict(state)
    batch = tokens(300)
    with torch.no_grad():
        torch.testing.assert_close(our_logits(ours, batch), llama(batch).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope type 'llama3'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "only LlamaForCausalLM"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "only LlamaForCausalLM"),  # model_type llama too
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    # rope_scaling is the legacy key, which transformers reads before rope_parameters
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
     "rope type 'linear'"),
    ({"head_dim": 32}, r"head_dim=32 x num_attention_heads=4 != hidden_size=64"),
    ({"hidden_size": 0}, "hidden_size=0 is not a positive integer"),
    ({}, "missing model.embed_tokens.weight"),  # representable config, no tensors
])
def test_unrepresentable_llama_is_refused(change, message):
    config = {**llama_config().to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        from_hf_llama(config, {})


def test_llama_import_takes_bf16_weights_as_fp32_and_ignores_old_rotary_buffers():
    """Real Llama checkpoints are mostly bf16; training starts from fp32 masters (interop.md). Older transformers
    saved each layer's rotary_emb.inv_freq, which RoPE's base already determines."""
    tensors = dict(tiny_llama().to(torch.bfloat16).state_dict())
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _, state = from_hf_llama(llama_config().to_dict(), tensors)
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert torch.equal(state["embedding.weight"], tensors["model.embed_tokens.weight"].float())


def test_swish_is_transformers_other_name_for_silu():
    from megatron_unipool.model.hf_format import llama_model_config

    assert llama_model_config({**llama_config().to_dict(), "hidden_act": "swish"}) == llama_model_config(
        llama_config().to_dict())


def test_llama_import_names_unexpected_tensors_and_uses_llama_defaults():
    """An extra tensor (a q_proj bias) is named, not dropped; a config.json without rms_norm_eps or
    tie_word_embeddings or max_position_embeddings means LlamaConfig's defaults (1e-6, untied, 2048).
    A tied model whose file holds an lm_head.weight of its own is refused: transformers loads the two
    untied, and a tied import would compute other logits."""
    config = llama_config().to_dict()
    tensors = dict(tiny_llama().state_dict())
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"unexpected model\.layers\.0\.self_attn\.q_proj\.bias"):
        from_hf_llama(config, tensors)
    from megatron_unipool.model.hf_format import llama_model_config

    tied = {**tiny_llama(tie=True).state_dict()}
    tied["lm_head.weight"] = tied["model.embed_tokens.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight although"):
        from_hf_llama(llama_config(tie=True).to_dict(), tied)
    for key in ("rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        del config[key]
    model = llama_model_config(config)
    assert model.norm_eps == 1e-6 and model.tie_embeddings is False and model.seq_len == 2048
    # both keys, disagreeing (by hand): rope_parameters wins, as in transformers 5
    assert llama_model_config({**config, "rope_theta": 1234.0}).rope_base == 50000.0
    # a rope_theta written as null (by hand: transformers writes a number) is a missing one: LlamaConfig's 10000
    del config["rope_parameters"]
    assert llama_model_config({**config, "rope_theta": None}).rope_base == 10000.0


def run_tool(*args: str, script: Path = TOOL) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_chain_llama_to_upcycled_mixtral_keeps_the_logits(tmp_path):
    """Sharded Llama -> our dense run -> tools/upcycle.py (vanilla, renormalised top-2) -> Mixtral export:
    every step computes the Llama's logits."""
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "llama", max_shard_size="100KB")
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file()
    batch = tokens(300)
    with torch.no_grad():
        expected = llama(batch).logits

    done = run_tool("--from", "hf", "--checkpoint", tmp_path / "llama", "--output", tmp_path / "dense",
                    "--set", "train.max_steps=10")
    assert done.returncode == 0, done.stderr
    assert "data.tokenizer" in done.stdout and "tools/upcycle.py" in done.stdout
    _, payload, dense, model = load_trained_model(tmp_path / "dense")
    assert dense.moe.kind == "dense" and dense.train.max_steps == 10 and payload["optimizer"] == {}
    assert payload["train_state"]["tokenizer"] is None  # no --set data.tokenizer: nothing known to record
    assert Path(dense.data.cache_dir).is_absolute()  # the default, relative to the directory the tool ran in
    torch.testing.assert_close(our_logits(model, batch), expected, atol=1e-4, rtol=1e-4)

    target = config_to_dict(dense)
    target["moe"] = {"kind": "vanilla", "num_experts": 4, "top_k": 2, "router": "softmax", "normalize_gates": True,
                     "aux_loss": "layer", "expert_ffn_hidden_size": dense.model.ffn_hidden_size}
    (tmp_path / "moe.json").write_text(json.dumps(target))
    done = run_tool("--checkpoint", tmp_path / "dense", "--to-config", tmp_path / "moe.json", "--output",
                    tmp_path / "moe", script=REPO / "tools" / "upcycle.py")
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(our_logits(load_trained_model(tmp_path / "moe")[3], batch), expected, atol=1e-4, rtol=1e-4)

    done = run_tool("--to", "hf", "--checkpoint", tmp_path / "moe", "--output", tmp_path / "mixtral")
    assert done.returncode == 0, done.stderr
    assert "MixtralForCausalLM" in done.stdout
    torch.testing.assert_close(hf_logits(tmp_path / "mixtral", batch), expected, atol=1e-4, rtol=1e-4)
    # readable by whoever may read config.json beside it (safetensors alone would write it 0600)
    modes = {name: stat.S_IMODE((tmp_path / "mixtral" / name).stat().st_mode)
             for name in ("config.json", "model.safetensors")}
    assert modes["model.safetensors"] == modes["config.json"], modes


@pytest.fixture(scope="module")
def convert_tool():
    """tools/convert_checkpoint.py as a module, for its readers (no fresh interpreter)."""
    from script_modules import load_script

    return load_script(TOOL)


def test_conversion_summary_counts_a_tied_tensor_once(convert_tool):
    """Parameters in millions and bytes in MiB, the tied output (the embedding under two names) counted once."""
    embedding, other = torch.zeros(1000, 1000), torch.zeros(500, 1000)
    assert convert_tool.describe({"embedding": embedding, "output": embedding, "norm": other}) == (
        f"3 tensors, 1.50M parameters, {6e6 / 2**20:.1f} MiB")


def test_bad_config_json_or_index_is_named_before_any_shard_is_read(tmp_path, convert_tool):
    from megatron_unipool.training import CheckpointError

    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")  # reading it would fail differently
    config = llama_config().to_dict()
    cases = [("{", r"config\.json is not readable JSON"),
             ("[]", r"config\.json must hold a JSON object, not list"),
             (json.dumps({k: v for k, v in config.items() if k != "hidden_size"}),
              r"config\.json: .*lacks required sizes:\n  hidden_size missing"),
             (json.dumps({**config, "vocab_size": "300"}),
              r"(?s)config\.json: .*vocab_size='300' is not a positive integer")]
    for text, message in cases:
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=message):
            convert_tool.read_hf_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    index = tmp_path / "model.safetensors.index.json"
    for text in ('{"metadata": {}}', '{"weight_map": []}', "{", "[]"):
        index.write_text(text)
        with pytest.raises(CheckpointError, match=r"safetensors\.index\.json (has no weight_map|is not readable|must hold a JSON object)"):
            convert_tool.read_hf_directory(tmp_path)
    done = run_tool("--from", "hf", "--checkpoint", tmp_path, "--output", tmp_path / "out")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "model.safetensors.index.json" in done.stderr and not (tmp_path / "out").exists()


def test_cli_refuses_without_writing_anything(tiny_config, tmp_path):
    config = tiny_config("configs/tiny_unipool_cpu.json", *SMALL)  # NormRouter: not expressible
    save_checkpoint(tmp_path / "run" / "checkpoints", 0, {
        "model": LanguageModel(config.model, config.moe).state_dict(), "optimizer": {}, "train_state": {},
        "rng": {}, "config": config_to_dict(config)}, keep_last=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")

    done = run_tool("--to", "hf", "--checkpoint", tmp_path / "run", "--output", tmp_path / "busy")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "--force" in done.stderr
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"

    done = run_tool("--to", "hf", "--checkpoint", tmp_path / "run", "--output", tmp_path / "out")
    assert done.returncode == 2 and "NormRouter" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "run"]  # no output, no temporary left


def test_cli_output_handling_replaces_only_what_it_may(tmp_path, convert_tool, capsys, monkeypatch):
    """--force replaces a directory or a file at --output; an --output that holds the source is refused
    even with --force (replacing it would delete the checkpoint); missing parents are made; a shard that
    cannot be read, weights that do not fit the --set config, and --set on export are refused with one
    line and leave nothing behind (a write that fails halfway keeps the run it was to replace); the written
    run says where its weights came from."""
    from megatron_unipool.training import CheckpointError

    tiny_llama().save_pretrained(tmp_path / "models" / "llama")
    source = tmp_path / "models" / "llama"
    before = sorted(p.name for p in source.iterdir())

    def convert(*args) -> tuple[int, str]:
        try:
            status = convert_tool.main(["--from", "hf", "--checkpoint", str(source), *map(str, args)])
        except SystemExit as e:  # argparse's refusals
            status = e.code
        return status, capsys.readouterr().err

    for output in (tmp_path / "models", source):
        status, err = convert("--output", output, "--force")
        assert status == 2 and "holds the --checkpoint" in err and sorted(p.name for p in source.iterdir()) == before

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.txt").write_text("replaced")
    (tmp_path / "file").write_text("a file")
    for output in (tmp_path / "busy", tmp_path / "file"):
        status, err = convert("--output", output)
        assert status == 2 and "exists and is not empty" in err and "--force" in err
        status, err = convert("--output", output, "--force")
        assert status == 0, err
        assert sorted(p.name for p in output.iterdir()) == ["checkpoints", "config.json"]
    _, payload, written, _ = load_trained_model(tmp_path / "busy")
    assert payload["imported_from"] == str(source)
    # the config loads the checkpoint where it was published (not in the temporary it was written to)
    assert written.checkpoint.load == str((tmp_path / "busy" / "checkpoints" / "step_0000000").resolve())
    assert convert("--output", tmp_path / "new" / "nested" / "run")[0] == 0
    status, err = convert("--output", tmp_path / "file" / "config.json" / "run")  # a parent is a file
    assert status == 2 and err == (f"error: --output {tmp_path / 'file' / 'config.json' / 'run'}:"
                                   f" {tmp_path / 'file' / 'config.json'} is a file, not a directory\n"), err

    status, err = convert("--output", tmp_path / "wide", "--set", "model.hidden_size=128")
    assert status == 2 and err.startswith("error: ") and "do not fit" in err and "vs model (96, 128)" in err
    assert not (tmp_path / "wide").exists()
    # the same shapes, another function: tying would make the embedding the Llama's lm_head; the heads
    # re-split, another RoPE base or norm epsilon would compute other logits from the same weights
    for change, named in (("model.tie_embeddings=true", "model.tie_embeddings=True (the checkpoint's is False)"),
                          ("model.num_heads=8", "model.num_heads=8 (the checkpoint's is 4)"),
                          ("model.rope_base=10000", "model.rope_base=10000.0 (the checkpoint's is 50000.0)"),
                          ("model.norm_eps=1e-6", "model.norm_eps=1e-06 (the checkpoint's is 0.01)")):
        status, err = convert("--output", tmp_path / "changed", "--set", change)
        assert status == 2 and "would change what the imported weights compute" in err and named in err, err
        assert not (tmp_path / "changed").exists()
    assert convert("--output", tmp_path / "shorter", "--set", "model.seq_len=16")[0] == 0  # the table's length: free

    # an export's --force must not delete the checkpoint it reads: the step directory the run resolves to, or
    # the checkpoints directory holding it, though neither is the --checkpoint as given (the run directory)
    step = latest_checkpoint(tmp_path / "busy" / "checkpoints")
    for output in (step, step.parent):
        done = convert_tool.main(["--to", "hf", "--checkpoint", str(tmp_path / "busy"), "--output", str(output),
                                  "--force"])
        assert done == 2 and "holds the --checkpoint" in capsys.readouterr().err and (step / "state.pt").is_file()
    # nor the directory the command runs in (its temporary would sit inside it; nothing was written)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    status, err = convert("--output", ".")
    assert status == 2 and "holds the directory this command runs in" in err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:
        convert_tool.main(["--to", "hf", "--checkpoint", str(tmp_path / "busy"), "--output", str(tmp_path / "hf"),
                           "--set", "train.max_steps=3"])
    assert refused.value.code == 2 and "--set applies to --from hf" in capsys.readouterr().err

    def fill_that_fails(directory, *args, **kwargs):  # a full disk halfway through writing
        (directory / "partial").write_text("half")
        raise CheckpointError("no space left on device")

    monkeypatch.setattr(convert_tool, "write_run_directory", fill_that_fails)
    status, err = convert("--output", tmp_path / "busy", "--force")
    assert status == 2 and "no space left" in err and not (tmp_path / ".busy.tmp").exists()
    assert load_trained_model(tmp_path / "busy")[1]["imported_from"] == str(source)  # the old run is intact
    monkeypatch.undo()

    # Ctrl-C once the old run is moved aside, before the new one takes its place: the old one is put back
    rename = Path.rename

    def interrupted_rename(self, target):
        if self.name == ".busy.tmp":
            raise KeyboardInterrupt
        return rename(self, target)

    (tmp_path / "busy" / "mine.txt").write_text("kept")
    monkeypatch.setattr(Path, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        convert("--output", tmp_path / "busy", "--force")
    monkeypatch.undo()
    assert (tmp_path / "busy" / "mine.txt").read_text() == "kept"
    assert not (tmp_path / ".busy.tmp").exists() and not (tmp_path / ".busy.old").exists()
    # killed between the renames: the next run puts the old output back first (a failure then keeps it)
    (tmp_path / "busy").rename(tmp_path / ".busy.old")
    monkeypatch.setattr(convert_tool, "write_run_directory", fill_that_fails)
    assert convert("--output", tmp_path / "busy", "--force")[0] == 2
    monkeypatch.undo()
    assert (tmp_path / "busy" / "mine.txt").read_text() == "kept"
    assert convert("--output", tmp_path / "busy", "--force")[0] == 0
    assert not (tmp_path / "busy" / "mine.txt").exists() and not (tmp_path / ".busy.old").exists()

    (source / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    status, err = convert("--output", tmp_path / "broken")
    assert status == 2 and "cannot be read" in err and "Traceback" not in err
    assert not (tmp_path / "broken").exists() and not (tmp_path / ".broken.tmp").exists()


def test_import_checks_a_tokenizer_given_with_set(tmp_path, convert_tool, capsys):
    """--set data.tokenizer=PATH is checked at import: a missing file, or a vocabulary larger than the model's,
    is refused there (the launcher found it only when the run started), with nothing written."""
    from megatron_unipool.data import build_tokenizer, train_bpe_tokenizer

    tiny_llama().save_pretrained(tmp_path / "llama")  # a vocabulary of 300
    words = [" ".join(f"w{i}" for i in range(400))] * 3
    assert train_bpe_tokenizer(words, 300, tmp_path / "fits.json").vocab_size == 300  # the boundary, each side
    assert train_bpe_tokenizer(words, 301, tmp_path / "too_large.json").vocab_size == 301
    capsys.readouterr()  # transformers' progress bars
    cases = [(tmp_path / "absent.json", "tokenizer file not found"),
             (tmp_path / "too_large.json", "301 tokens, more than the imported model's vocabulary of 300")]
    for tokenizer, message in cases:
        output = tmp_path / tokenizer.stem
        assert convert_tool.main(["--from", "hf", "--checkpoint", str(tmp_path / "llama"), "--output", str(output),
                                  "--set", f"data.tokenizer={tokenizer}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: data.tokenizer={str(tokenizer)!r}") and message in err, err
        assert not output.exists()
    assert convert_tool.main(["--from", "hf", "--checkpoint", str(tmp_path / "llama"), "--output", str(tmp_path / "ok"),
                              "--set", f"data.tokenizer={tmp_path / 'fits.json'}"]) == 0
    _, payload, config, _ = load_trained_model(tmp_path / "ok")
    assert config.data.tokenizer == str(tmp_path / "fits.json")
    # recorded as what the model's ids mean (tools/generate.py decodes with it; a run on another's data is noted)
    fits = build_tokenizer(str(tmp_path / "fits.json"))
    assert payload["train_state"]["tokenizer"] == fits.name
    assert (payload["train_state"]["tokenizer_vocab_size"], payload["train_state"]["eod_id"]) == (300, fits.eod_id)
    # naming the default explicitly is naming it: checked and recorded too
    assert convert_tool.main(["--from", "hf", "--checkpoint", str(tmp_path / "llama"), "--output",
                              str(tmp_path / "byte"), "--set", "data.tokenizer=byte"]) == 0
    assert load_trained_model(tmp_path / "byte")[1]["train_state"]["tokenizer"] == "byte"
