"""model.document_masking: a sample packing several documents computes each of them as the model computes that
document alone (attention within documents; RoPE is relative, so each document's offset in the sample does not
matter), in the model, its recomputation and compilation variants, and the trainer."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_unipool.config import ConfigError, load_config
from megatron_unipool.model import LanguageModel
from megatron_unipool.model.documents import document_index
from megatron_unipool.training import Trainer
from test_data import random_documents, write_documents

EOD = 7


def packed_rows() -> torch.Tensor:
    """Two samples of 24 tokens: documents of several lengths, one cut at each end of the sample, an EOD first
    and two in a row (an empty document)."""
    rng = np.random.default_rng(0)
    row = lambda: rng.integers(8, 60, 24)  # noqa: E731  ids other than EOD
    first, second = row(), row()
    first[[4, 11, 12, 20]] = EOD
    second[[0, 9, 23]] = EOD
    return torch.from_numpy(np.stack([first, second]))


def documents_of(row: torch.Tensor) -> list[torch.Tensor]:
    """A sample's documents, each with the EOD that ends it (the last one as far as the sample holds it)."""
    ends = [i for i, token in enumerate(row.tolist()) if token == EOD]
    starts = [0] + [end + 1 for end in ends]
    return [row[start: end + 1] for start, end in zip(starts, ends + [len(row) - 1]) if start < len(row)]


def test_document_index_counts_the_end_of_document_ids_before_each_token():
    tokens = packed_rows()
    for row, row_index in zip(tokens, document_index(tokens, EOD)):
        assert row_index.tolist() == [number for number, document in enumerate(documents_of(row)) for _ in document]


def model_config(kind: str, *overrides: str):
    return load_config(f"configs/tiny_{kind}_cpu.json", ["model.seq_len=24", "model.vocab_size=64",
                                                          "model.document_masking=true", *overrides])


@pytest.mark.parametrize("kind, overrides", [
    ("dense", []), ("vanilla", []), ("unipool", []), ("unipool", ["moe.router=norm", "moe.top_k=1"]),
    ("unipool", ["model.activation_checkpointing=attention"]), ("unipool", ["model.activation_checkpointing=block"]),
    ("dense", ["model.num_kv_heads=4", "model.tie_embeddings=true"]),
])
def test_a_packed_sample_computes_each_document_as_alone(kind, overrides):
    """Logits of the packed samples equal each document's run on its own (dropless routing: tokens route
    independently), and so does every gradient of the LM loss over them; without the masking they differ."""
    config = model_config(kind, "moe.aux_loss_coeff=0", *overrides)
    torch.manual_seed(0)
    model = LanguageModel(config.model, config.moe)
    tokens = packed_rows()
    targets = torch.randint(0, 64, tokens.shape)

    def packed(model):
        return model(tokens, model.documents_of(tokens, EOD))[0]

    def alone(model):  # each document from position 0, by itself
        return torch.stack([torch.cat([model(document[None])[0][0] for document in documents_of(row)])
                            for row in tokens])

    results = []
    for forward in (packed, alone):
        copy_ = copy.deepcopy(model)
        logits = forward(copy_)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        results.append((logits.detach(), {name: p.grad for name, p in copy_.named_parameters() if p.grad is not None}))
    (logits, grads), (expected_logits, expected_grads) = results
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    causal = model(tokens)[0]  # the documents' second and later tokens see the documents before them
    assert not torch.allclose(causal, expected_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_backward_keeps_one_mask_per_micro_batch_not_one_per_layer(autocast):
    """The mask is built once, additive, in attention's dtype: a boolean one (or one of another dtype) would be
    converted by SDPA in every layer, each copy kept for backward (layers x B x S^2 values)."""
    config = model_config("dense", "model.num_layers=4")
    model = LanguageModel(config.model, config.moe)
    tokens = packed_rows()
    masks = {}

    def keep(tensor):
        if tensor.dim() == 4 and tensor.shape[-2:] == (24, 24) and tensor.shape[1] == 1:
            masks[tensor.untyped_storage().data_ptr()] = tensor.dtype
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(tokens, model.documents_of(tokens, EOD))[0].sum().backward()
    assert list(masks.values()) == [torch.bfloat16 if autocast else torch.float32]


def test_compiled_blocks_take_the_document_mask():
    config = model_config("unipool", "model.compile=true")
    torch.manual_seed(0)
    model = LanguageModel(config.model, config.moe)
    eager = LanguageModel(config.model.__class__(**{**config.model.__dict__, "compile": False}), config.moe)
    eager.load_state_dict(model.state_dict())
    tokens = packed_rows()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, model.documents_of(tokens, EOD))[0],
                                   eager(tokens, eager.documents_of(tokens, EOD))[0], rtol=1e-5, atol=1e-5)


def test_document_masking_refuses_flash_attn_which_takes_no_mask():
    with pytest.raises(ConfigError, match="model.document_masking with model.attention='flash': flash-attn's causal"
                                          " kernel takes no document mask; use 'auto' or 'sdpa'"):
        model_config("unipool", "model.attention=flash")


@pytest.fixture
def short_documents_trainer(tiny_config, tmp_path):
    """A trainer with document masking on data of documents up to 40 tokens (several to a sample of 64),
    whose end-of-document id (249) is neither the model's last id nor the byte tokenizer's."""
    rng = np.random.default_rng(1)
    for split in ("train", "valid"):
        write_documents(tmp_path / split, random_documents(rng, 250, 249, 300), vocab_size=250, eod_id=249)
    return Trainer(tiny_config("configs/tiny_vanilla_cpu.json", "data.corpus=null",
                               f"data.train_prefix={tmp_path / 'train'}", f"data.valid_prefix={tmp_path / 'valid'}",
                               "model.document_masking=true", "moe.aux_loss_coeff=0"), tmp_path / "run")


def test_the_trainer_masks_each_sample_at_the_datas_end_of_document_id(short_documents_trainer):
    """The first step's LM loss is the mean over the global batch of each document's own cross-entropy."""
    trainer = short_documents_trainer
    tokens = trainer.data.train.batch(0, trainer.config.train.global_batch)
    inputs = tokens[:, :-1]
    assert (inputs == 249).sum() >= 2 * len(inputs)
    model = copy.deepcopy(trainer.model)
    total = 0.0
    with torch.no_grad():
        for row, targets in zip(inputs, tokens[:, 1:]):
            ends = (row == 249).nonzero().flatten().tolist()
            bounds = zip([0] + [end + 1 for end in ends], ends + [len(row) - 1])
            logits = torch.cat([model(row[start: end + 1][None])[0][0] for start, end in bounds if start < len(row)])
            total += F.cross_entropy(logits, targets, reduction="sum").item()
    metrics, _ = trainer.train_step()
    assert metrics["lm_loss"] == pytest.approx(total / inputs.numel(), rel=1e-5)


def test_the_routing_tools_evaluate_as_the_trainer_does(short_documents_trainer):
    """The probe's loss (routing_batches: the validation batches and the data's EOD id) is the trainer's
    validation loss; without the EOD id it reads each window whole, another number."""
    from megatron_unipool.training.probe import next_token_scores, probe, routing_batches

    trainer = short_documents_trainer
    batches, eod_id = routing_batches(trainer.config)
    validation = trainer.evaluate().loss
    assert eod_id == 249
    assert next_token_scores(trainer.model, batches, eod_id).loss == pytest.approx(validation, rel=1e-6)
    assert probe(trainer.model, batches, [0], None, eod_id=eod_id)[0].loss == pytest.approx(validation, rel=1e-6)
    assert next_token_scores(trainer.model, batches).loss != pytest.approx(validation, rel=1e-3)


def test_expert_utility_reads_the_documents_as_training_does(short_documents_trainer):
    """Upcycling's utility (grad_sq) is the squared gradient of the document-masked LM loss: utility_batches gives
    the data's EOD id, and expert_utility masks by it."""
    from megatron_unipool.training.upcycling import expert_utility, utility_batches

    trainer = short_documents_trainer
    model = trainer.model
    batches, eod_id = utility_batches(trainer.config, 2, 2)
    utilities = expert_utility(model, batches, eod_id=eod_id)
    weights = [w for pool in model.expert_pools for w in (pool.w_gate, pool.w_up, pool.w_down)]
    mean_grads = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for batch in batches:
        logits, _ = model(batch[:, :-1], document_index(batch[:, :-1], 249))
        grads = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()), weights)
        for total, grad in zip(mean_grads, grads):
            total += grad.double() / len(batches)
    for p, utility in enumerate(utilities):
        expected = sum(g.flatten(1).pow(2).sum(1) for g in mean_grads[3 * p:3 * p + 3])
        torch.testing.assert_close(utility, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(expert_utility(model, batches)[0], utilities[0], rtol=1e-3)


def test_the_routing_tools_read_a_document_masking_run_as_it_trained(short_documents_trainer, tmp_path):
    """tools/routing_probe.py's learned-routing loss and tools/evaluate.py's are the run's validation loss, and
    tools/plot_utilisation.py counts the experts the masked model picks."""
    from megatron_unipool.training.probe import record_routing, routing_batches
    from script_modules import load_script

    trainer = short_documents_trainer
    trainer.train_step()  # a run that has read training data: the evaluate tool reads its validation file
    trainer.save()
    run = trainer.run_dir
    tools = Path(__file__).resolve().parents[1] / "tools"
    assert load_script(tools / "routing_probe.py").main(["--checkpoint", str(run), "--layers", "0", "--seeds", "1",
                                                        "--output", str(tmp_path / "probe")]) == 0
    probed = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert probed["baseline"] == pytest.approx(trainer.evaluate().loss, rel=1e-6)
    assert load_script(tools / "evaluate.py").main(["--checkpoint", str(run), "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["rows"][0]["loss"] == pytest.approx(probed["baseline"], rel=1e-6)
    assert load_script(tools / "plot_utilisation.py").main(["--checkpoint", str(run), "--output",
                                                           str(tmp_path / "plots")]) == 0
    report = json.loads((tmp_path / "plots" / "utilisation.json").read_text())
    _, routing = record_routing(trainer.model, *routing_batches(trainer.config))
    assert report["counts_per_pool"][0][0] == torch.bincount(routing[0].flatten(), minlength=8).tolist()


def test_utility_upcycling_scores_a_document_masking_run_by_its_data_s_documents(short_documents_trainer, tmp_path,
                                                                                 monkeypatch):
    from script_modules import load_script

    trainer = short_documents_trainer
    trainer.save()
    tool = load_script(Path(__file__).resolve().parents[1] / "tools" / "upcycle.py")
    calls = []
    real = tool.expert_utility
    monkeypatch.setattr(tool, "expert_utility", lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    assert tool.main(["--checkpoint", str(trainer.run_dir), "--multiplier", "2", "--selection", "utility",
                      "--utility-batches", "1", "--output", str(tmp_path / "upcycled")]) == 0
    assert [call["eod_id"] for call in calls] == [249]
