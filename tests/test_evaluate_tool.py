"""tools/evaluate.py: a trained run's validation loss on its own validation files or on any others of its
tokenizer, against the trainer's own evaluation of the same files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_unipool.data import IndexedDataset, IndexedDatasetWriter, prepare_default_corpus
from megatron_unipool.training import Trainer
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


def test_the_runs_own_validation_file_gives_its_validation_loss(trained_run, tmp_path, capsys):
    run, summary = trained_run
    assert evaluate_tool.main(["--checkpoint", str(run), "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert row["prefix"] == str(Path(prepare_default_corpus("byte", summary["config"]["data"]["cache_dir"])[1]).absolute())
    train = summary["config"]["train"]
    assert row["sequences"] == train["eval_batches"] * train["global_batch"]
    assert row["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert f"{row['prefix']} {row['sequences']:>9} {row['loss']:>8.4f} {row['perplexity']:>11.3f}" in out


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
        assert row["perplexity"] == pytest.approx(np.exp(row["loss"]))
    assert written["rows"][0]["loss"] != pytest.approx(written["rows"][1]["loss"], rel=1e-3)


def test_files_it_cannot_read_as_the_run_did_are_refused(trained_run, data_cache, tmp_path, capsys):
    run, _ = trained_run
    held_out = IndexedDataset(prepare_default_corpus("byte", data_cache)[1])
    other = written_like(str(tmp_path / "other"), held_out, np.asarray(held_out.tokens(0, 5000)), tokenizer="gpt2")
    assert evaluate_tool.main(["--checkpoint", str(run), "--data", other]) == 2
    assert "other was written by tokenizer gpt2, the run trained on ids of byte" in capsys.readouterr().err
    assert evaluate_tool.main(["--checkpoint", str(run), "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    for arguments, message in ((["--eval-batches", "0"], "--eval-batches must be at least 1"),
                               (["--data", other, other], "--data names a file twice")):
        with pytest.raises(SystemExit):
            evaluate_tool.main(["--checkpoint", str(run), *arguments])
        assert message in capsys.readouterr().err
