"""Sampling text from a trained model: the library's generate() against the model's own logits and the
tempered top-k distribution, and tools/generate.py on a trained run."""
import json
from pathlib import Path

import pytest
import tokenizers as hf_tokenizers
import torch

from megatron_unipool.config import load_config
from megatron_unipool.data import DataError, build_tokenizer, train_bpe_tokenizer
from megatron_unipool.model import LanguageModel
from megatron_unipool.model.generation import generate, next_tokens
from megatron_unipool.training import Trainer
from megatron_unipool.training.checkpoint import load_trained_model
from script_modules import load_script

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 16

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    config = load_config(REPO / "configs/tiny_unipool_cpu.json", [f"model.seq_len={CONTEXT}"])
    torch.manual_seed(0)
    return LanguageModel(config.model, config.moe).eval()


def greedy_reference(model, prompt: list[int], new: int, vocab_size: int) -> list[int]:
    """The most likely next id, over the last CONTEXT ids, one at a time."""
    ids = list(prompt)
    for _ in range(new):
        with torch.no_grad():
            logits = model(torch.tensor([ids[-CONTEXT:]]))[0][0, -1]
        ids.append(int(logits[:vocab_size].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_takes_the_models_most_likely_id_over_its_context_window(model):
    prompt = [256, 70, 105, 114, 115]
    expected = greedy_reference(model, prompt, 20, vocab_size=257)  # 25 ids: the window slides past the prompt
    assert generate(model, prompt, 20, CONTEXT, temperature=0, vocab_size=257) == [expected]
    # dropless routing: the rows of a batch are independent samples
    assert generate(model, prompt, 20, CONTEXT, num_samples=3, temperature=0, vocab_size=257) == [expected] * 3
    # ids past the tokenizer's vocabulary (the model's is padded to 320) are never chosen
    narrow = greedy_reference(model, prompt, 20, vocab_size=100)
    assert generate(model, prompt, 20, CONTEXT, temperature=0, vocab_size=100) == [narrow]
    assert max(narrow) < 100
    sampled = generate(model, prompt, 30, CONTEXT, num_samples=4, temperature=5.0, vocab_size=100,
                       generator=torch.Generator().manual_seed(0))
    assert all(0 <= i < 100 for row in sampled for i in row) and len({tuple(row) for row in sampled}) > 1


def test_generation_ends_before_the_stop_id(model):
    prompt = [256, 70, 105]
    greedy = greedy_reference(model, prompt, 12, vocab_size=257)
    stop = greedy[5]
    assert generate(model, prompt, 12, CONTEXT, temperature=0, vocab_size=257, stop_id=stop) == [
        greedy[:greedy.index(stop)]]
    calls = []
    generate(model, prompt, 12, CONTEXT, temperature=0, vocab_size=257, stop_id=stop, progress=calls.append)
    assert calls == list(range(1, greedy.index(stop) + 2))  # every row stopped: no token after the stop id
    with pytest.raises(ValueError, match="the prompt holds no token"):
        generate(model, [], 3, CONTEXT)


def test_a_document_masking_model_continues_the_prompts_last_document_alone():
    """model.document_masking: attention stays within the prompt's last document, as in training, so the EOD
    that opens it (and any document before) changes nothing; without eod_id the model reads the window whole."""
    config = load_config(REPO / "configs/tiny_unipool_cpu.json", [f"model.seq_len={CONTEXT}", "model.document_masking=true"])
    torch.manual_seed(0)
    model = LanguageModel(config.model, config.moe).eval()
    document = [70, 105, 114]
    alone = greedy_reference(model, document, 8, vocab_size=257)  # 11 ids: inside the window throughout
    for before in ([256], [80, 81, 256]):
        assert generate(model, before + document, 8, CONTEXT, temperature=0, vocab_size=257, eod_id=256) == [alone]
    assert generate(model, [80, 81, 256] + document, 8, CONTEXT, temperature=0, vocab_size=257) != [alone]


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, None), (2.0, 3), (1.0, 1)])
def test_draws_follow_the_tempered_distribution_over_the_top_k(temperature, top_k):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    draws = 40_000
    picks = next_tokens(logits.repeat(draws, 1), temperature, top_k, torch.Generator().manual_seed(1))
    frequencies = torch.bincount(picks, minlength=6).double() / draws
    kept = logits >= logits.topk(top_k or 6).values[-1]
    expected = torch.where(kept, logits.double() / temperature, float("-inf")).softmax(dim=0)
    assert torch.all(frequencies[~kept] == 0)
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)  # 4 standard errors at most
    again = next_tokens(logits.repeat(draws, 1), temperature, top_k, torch.Generator().manual_seed(1))
    assert torch.equal(picks, again)
    assert next_tokens(logits[None], 0, None).item() == 5


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("generation") / "run"
    config = load_config(REPO / "configs/tiny_unipool_cpu.json",
                         [f"data.cache_dir={data_cache}", "logging.tensorboard=false", "model.seq_len=32",
                          "train.global_batch=8", "train.micro_batch=8", "train.max_steps=3", "train.eval_interval=0"])
    Trainer(config, run).train()
    return run


def test_tool_writes_the_librarys_samples_decoded_by_the_runs_tokenizer(trained_run, tmp_path, capsys, monkeypatch):
    tool = load_script(REPO / "tools" / "generate.py")
    monkeypatch.setattr(tool, "PROGRESS_EVERY_S", 0.0)
    out = tmp_path / "new" / "samples.json"  # a folder made for it
    assert tool.main(["--checkpoint", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                      "--num-samples", "2", "--temperature", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    _, _, config, model = load_trained_model(trained_run)
    byte = build_tokenizer("byte")
    expected = generate(model, [byte.eod_id] + byte.encode("ROMEO:"), 12, config.model.seq_len, num_samples=2,
                        temperature=0, vocab_size=byte.vocab_size, stop_id=byte.eod_id)
    assert [row["ids"] for row in written["samples"]] == expected
    for row, ids in zip(written["samples"], expected):
        assert row["text"] == "ROMEO:" + byte.decode(ids) and row["text"] in printed
        assert row["ended"] == ("max_new_tokens" if len(ids) == 12 else "end of document")
    assert written["tokenizer"] == "byte" and written["temperature"] == 0
    assert "  12/12 tokens (" in printed  # progress, here after every token
    # a sample that reaches the end-of-document id ends there: here the model's fourth id stands for it
    stop = expected[0][3]
    monkeypatch.setattr(tool, "generate", lambda *args, **kwargs: generate(*args, **{**kwargs, "stop_id": stop}))
    assert tool.main(["--checkpoint", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                      "--temperature", "0", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())["samples"]
    assert row["ids"] == expected[0][:expected[0].index(stop)] and row["ended"] == "end of document"


def test_tool_refuses_another_tokenizer_and_bad_options(trained_run, tmp_path, capsys):
    tool = load_script(REPO / "tools" / "generate.py")
    assert tool.main(["--checkpoint", str(trained_run), "--json", str(tmp_path)]) == 2  # before sampling
    assert f"error: --json {tmp_path}: {tmp_path} is a directory, not a file" in capsys.readouterr().err
    assert tool.main(["--checkpoint", str(trained_run), "--tokenizer", "gpt2", "--max-new-tokens", "2"]) == 2
    assert ("error: the run's training data was written by tokenizer byte, not gpt2: its ids would decode to other"
            " text; use --tokenizer byte") in capsys.readouterr().err
    for option, value, named in (("--max-new-tokens", "0", "--max-new-tokens must be at least 1, not 0"),
                                 ("--top-k", "0", "--top-k must be at least 1, not 0"),
                                 ("--num-samples", "0", "--num-samples must be at least 1, not 0"),
                                 ("--seed", "-1", "--seed must be >= 0, not -1"),
                                 ("--temperature", "nan", "--temperature must be a finite number >= 0, not nan")):
        with pytest.raises(SystemExit):
            tool.main(["--checkpoint", str(trained_run), option, value])
        assert named in capsys.readouterr().err


def test_a_tokenizer_json_run_needs_its_own_file(tmp_path):
    tool = load_script(REPO / "tools" / "generate.py")
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen liquor jugs " * 20]
    own = train_bpe_tokenizer(iter(texts), 300, tmp_path / "own" / "tokenizer.json")
    other = train_bpe_tokenizer(iter(texts[:1]), 280, tmp_path / "other" / "tokenizer.json")
    config = load_config(REPO / "configs/tiny_unipool_cpu.json", [])  # data.tokenizer byte: a run on files
    with pytest.raises(DataError, match=rf"written by tokenizer {own.name}, not byte: .*pass the run's tokenizer.json"
                                        " as --tokenizer"):
        tool.run_tokenizer(own.name, config, None)
    assert tool.run_tokenizer(own.name, config, str(tmp_path / "own" / "tokenizer.json")).name == own.name
    with pytest.raises(DataError, match=rf"not .*other/tokenizer.json \({other.name}\)"):
        tool.run_tokenizer(own.name, config, str(tmp_path / "other" / "tokenizer.json"))
    # a run that tokenised the built-in corpus with a tokenizer.json names it in data.tokenizer
    corpus_run = load_config(REPO / "configs/tiny_unipool_cpu.json", [f"data.tokenizer={tmp_path}/own/tokenizer.json"])
    assert tool.run_tokenizer(own.name, corpus_run, None).name == own.name
    # a built-in tokenizer the run recorded wins over a data.tokenizer that did not write its files
    assert tool.run_tokenizer("byte", corpus_run, None).name == "byte"
    with pytest.raises(DataError, match="more than the model's model.vocab_size=200"):
        tool.run_tokenizer("byte", load_config(REPO / "configs/tiny_unipool_cpu.json", ["model.vocab_size=200"]), None)
    exact = load_config(REPO / "configs/tiny_unipool_cpu.json", ["model.vocab_size=257"])  # no padding: fits
    assert tool.run_tokenizer("byte", exact, None).vocab_size == 257
    # a run recording none (an import, data of an older format) is not decoded by a default that never read it
    with pytest.raises(DataError, match=r"does not record the tokenizer its ids belong to .*: pass it as --tokenizer"
                                        rf" \(the imported model's is {tmp_path}/own/tokenizer.json\)$"):
        tool.run_tokenizer(None, config, None, imported_from=str(tmp_path / "own"))
    with pytest.raises(DataError, match=r"pass it as --tokenizer$"):  # no hint at a file that is not there
        tool.run_tokenizer(None, config, None, imported_from=str(tmp_path / "moved"))
    assert tool.run_tokenizer(None, config, str(tmp_path / "own" / "tokenizer.json")).name == own.name


def test_the_continuation_keeps_the_space_a_sentencepiece_decoder_strips_at_a_texts_start(tmp_path):
    """Metaspace decoders (Llama 2, Mistral, Gemma tokenizer.json) drop the leading space of the text they
    decode: the continuation is the text of prompt + continuation past the prompt's."""
    tool = load_script(REPO / "tools" / "generate.py")
    spm = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer = hf_tokenizers.pre_tokenizers.Metaspace()
    spm.decoder = hf_tokenizers.decoders.Metaspace()
    spm.train_from_iterator(["hello world, hello there"] * 10, hf_tokenizers.trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<unk>", "</s>"]))
    spm.save(str(tmp_path / "tokenizer.json"))
    tokenizer = build_tokenizer(str(tmp_path / "tokenizer.json"))
    prompt, continuation = tokenizer.encode("hello"), tokenizer.encode("hello world")[len(tokenizer.encode("hello")):]
    assert tokenizer.decode(continuation) == "world"  # decoded alone, the space is gone
    assert "hello" + tool.continuation_text(tokenizer, prompt, continuation) == "hello world"
    byte = build_tokenizer("byte")
    assert tool.continuation_text(byte, byte.encode("ROMEO:"), byte.encode(" Ay")) == " Ay"
