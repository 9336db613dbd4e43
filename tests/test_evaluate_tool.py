"""tools/evaluate.py: a trained run's validation loss on its own validation files or on any others of its
tokenizer, against the trainer's own evaluation of the same files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_unipool.data import IndexedDataset, IndexedDatasetWriter, prepare_default_corpus
from megatron_unipool.training import Trainer
from megatron_unipool.training.datasets import validation_batches
from script_modules import load_script

REPO = Path(__file__).resolve().parents[1]
evaluate_tool = load_script(REPO / "tools" / "evaluate.py")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def trained_run(tmp_path, tiny_config):
    """A 3-step UniPool run on the built-in corpus, and its summary."""
    run = tmp_path / "run"
    return run, Trainer(tiny_config("configs/tiny_unipool_cpu.json", "train.max_steps=3"), run).train()


def written_like(prefix: str, like: IndexedDataset, tokens: np.ndarray, tokenizer: str | None = None) -> str:
    with IndexedDatasetWriter(prefix, like.vocab_size, like.eod_id, tokenizer or like.tokenizer) as writer:
        writer.add_document(tokens[tokens != like.eod_id])
    return prefix


def test_the_runs_own_validation_file_gives_its_validation_loss(trained_run, tmp_path, capsys, monkeypatch):
    run, summary = trained_run
    monkeypatch.setattr(evaluate_tool, "PROGRESS_EVERY_S", 0.0)  # a progress line after every micro-batch
    assert evaluate_tool.main(["--checkpoint", str(run), "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert row["prefix"] == str(Path(prepare_default_corpus("byte", summary["config"]["data"]["cache_dir"])[1]).absolute())
    train = summary["config"]["train"]
    assert row["sequences"] == train["eval_batches"] * train["global_batch"]
    assert row["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert (f"{row['prefix']} {row['sequences']:>9} {row['loss']:>8.4f} {row['perplexity']:>11.3f}"
            f" {row['accuracy']:>9.2%}") in out
    assert f"  [1/1] {row['prefix']}: 1/2 micro-batches" in out and "2/2 micro-batches" not in out


def test_other_files_each_give_the_loss_a_run_validating_on_them_reports(trained_run, data_cache, tmp_path, tiny_config):
    """Each --data file against a Trainer resumed from the run with that file as its validation split and the
    same --eval-batches: the trainer's evaluation of the same sequences; the JSON holds the printed rows."""
    run, _ = trained_run
    held_out = IndexedDataset(prepare_default_corpus("byte", data_cache)[1])
    stream = np.asarray(held_out.tokens(0, held_out.num_tokens))
    files = [written_like(str(tmp_path / "reversed"), held_out, stream[::-1].copy()),
             written_like(str(tmp_path / "rolled"), held_out, np.roll(stream, 5000))]
    assert evaluate_tool.main(["--checkpoint", str(run), "--data", *files, "--eval-batches", "2",
                               "--json", str(tmp_path / "out" / "eval.json")]) == 0
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written["step"] == 3 and [row["prefix"] for row in written["rows"]] == files
    for prefix, row in zip(files, written["rows"]):
        trainer = Trainer(tiny_config("configs/tiny_unipool_cpu.json", "data.corpus=null", f"data.valid_prefix={prefix}",
                                      f"data.train_prefix={prepare_default_corpus('byte', data_cache)[0]}",
                                      "train.eval_batches=2", "train.max_steps=3", f"checkpoint.load={run}"),
                          tmp_path / f"resumed_{Path(prefix).name}")
        assert row["loss"] == pytest.approx(trainer.evaluate().loss, rel=1e-6)
        assert row["sequences"] == 2 * trainer.config.train.global_batch
        batches = validation_batches(trainer.data.valid, trainer.config.train.micro_batch, row["sequences"])
        with torch.no_grad():  # next-token accuracy: the targets that are the model's most likely id
            hits = sum(int((trainer.model.eval()(b[:, :-1])[0].argmax(-1) == b[:, 1:]).sum()) for b in batches)
        assert row["accuracy"] == pytest.approx(hits / row["tokens"], rel=1e-12) and 0 < row["accuracy"] < 1
        assert row["perplexity"] == pytest.approx(np.exp(row["loss"]))
    assert written["rows"][0]["loss"] != pytest.approx(written["rows"][1]["loss"], rel=1e-3)


def test_files_it_cannot_read_as_the_run_did_are_refused_before_any_is_evaluated(trained_run, data_cache, tmp_path,
                                                                                 capsys):
    """Another tokenizer's file (by name, or by its end-of-document id where names agree), a missing or damaged
    file, one too small for a micro-batch: one line each, status 2, and nothing evaluated before."""
    run, _ = trained_run
    held_out = IndexedDataset(prepare_default_corpus("byte", data_cache)[1])
    some = np.asarray(held_out.tokens(0, 5000))
    good = written_like(str(tmp_path / "good"), held_out, some)
    other = written_like(str(tmp_path / "other"), held_out, some, tokenizer="gpt2")
    with IndexedDatasetWriter(str(tmp_path / "eod0"), held_out.vocab_size, 0, "byte") as writer:
        writer.add_document(some[some != 0])
    tiny = written_like(str(tmp_path / "tiny"), held_out, some[:100])
    damaged = written_like(str(tmp_path / "damaged"), held_out, some)
    tokens = np.memmap(tmp_path / "damaged.bin", dtype=np.uint16, mode="r+")
    tokens[::7] = 300  # past the byte tokenizer's 257 ids
    tokens.flush()
    for data, message in (([other], "other comes from another tokenizer than the run's training data: tokenizer"
                                    " gpt2 (the run's: byte)"),
                          ([str(tmp_path / "eod0")], "eod0 comes from another tokenizer than the run's training data:"
                                                     " EOD id 0 (the run's: 256)"),
                          ([good, str(tmp_path / "missing")], "missing"),
                          ([good, tiny], "tiny holds 1 sequences of 64 tokens, fewer than train.micro_batch=4"),
                          ([good, damaged], "token id 300")):
        assert evaluate_tool.main(["--checkpoint", str(run), "--data", *data]) == 2
        printed = capsys.readouterr()
        assert message in printed.err and printed.err.count("\n") == 1 and "[1/" not in printed.out, printed
    (tmp_path / "folder").mkdir()
    assert evaluate_tool.main(["--checkpoint", str(run), "--data", good, "--json", str(tmp_path / "folder")]) == 2
    assert "is a directory, not a file" in capsys.readouterr().err
    spelled_twice = [good, str(tmp_path / "x" / ".." / "good")]
    for arguments, message in ((["--eval-batches", "0"], "--eval-batches must be at least 1"),
                               (["--data", *spelled_twice], "--data names a file twice")):
        with pytest.raises(SystemExit):
            evaluate_tool.main(["--checkpoint", str(run), *arguments])
        assert message in capsys.readouterr().err


def test_an_import_needs_the_files_named_and_says_when_their_ids_are_unchecked(trained_run, data_cache, tmp_path,
                                                                              capsys):
    """An import has read no training data: its data section is defaults (whether or not --set named its
    tokenizer), so the files must be named; without a tokenizer recorded their ids cannot be checked. A run that
    trained on files recording no tokenizer (index format 1) reads its own validation files."""
    from megatron_unipool.training.checkpoint import load_trained_model, write_run_directory

    run, _ = trained_run
    _, payload, config, model = load_trained_model(run)
    valid = prepare_default_corpus("byte", data_cache)[1]
    for name, state in (("import", {"consumed_samples": 0}),
                        ("named", {"consumed_samples": 0, "tokenizer": "byte", "tokenizer_vocab_size": 257,
                                   "eod_id": 256})):
        write_run_directory(tmp_path / name, config, model.state_dict(), {}, state)
        assert evaluate_tool.main(["--checkpoint", str(tmp_path / name)]) == 2
        assert "the run has read no training data" in capsys.readouterr().err
        assert evaluate_tool.main(["--checkpoint", str(tmp_path / name), "--data", valid]) == 0
        assert ("note: the run does not record the tokenizer" in capsys.readouterr().out) == (name == "import")
    older = {**payload["train_state"], "tokenizer": None, "tokenizer_vocab_size": None, "eod_id": None}
    write_run_directory(tmp_path / "older", config, model.state_dict(), {}, older)
    assert evaluate_tool.main(["--checkpoint", str(tmp_path / "older")]) == 0
    # a run on preprocessed files that moved since: said, with the way out
    moved = dataclasses.replace(config, data=dataclasses.replace(config.data, corpus=None, train_prefix=str(tmp_path / "gone_train"),
                                                                 valid_prefix=str(tmp_path / "gone_valid")))
    write_run_directory(tmp_path / "moved", moved, model.state_dict(), {}, payload["train_state"])
    capsys.readouterr()
    assert evaluate_tool.main(["--checkpoint", str(tmp_path / "moved")]) == 2
    assert "gone_valid is not there (moved?): name the files to evaluate with --data" in capsys.readouterr().err
