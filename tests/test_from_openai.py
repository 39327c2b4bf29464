"""Starting from OpenAI's GPT-2 by Hub id, offline: a real Hugging Face cache in a temporary HF_HOME holds a small
random stock GPT-2 (OpenAI's file layout, non-zero biases, vocabulary 50,257) and OpenAI's tokenizer files. Python,
the CLI and the three training scripts take it by id; every wrong source is one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import openai_style_folder, stock_gpt2, tiny_config, write_json
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

from gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchForSequenceClassification
from gpt2_scratch.classification import build_parser as classification_parser
from gpt2_scratch.classification import run as classify
from gpt2_scratch.cli import main as cli
from gpt2_scratch.instruction import build_parser as instruction_parser
from gpt2_scratch.instruction import run as instruct
from gpt2_scratch.pretraining import build_parser as pretraining_parser
from gpt2_scratch.pretraining import run as pretrain
from gpt2_scratch.sources import fetch

OPENAI = "openai-community/gpt2"
LEGACY = "distilgpt2"  # ids without an owner resolve the same way
BERT = "someone/tiny-bert"
INCOMPLETE = "someone/gpt2-missing-a-tensor"
EXTRA = "someone/gpt2-with-an-extra-tensor"
RELU = "someone/gpt2-relu"
CONTEXT = 128  # room for the instruction template; OpenAI's is 1024
SHAPE = dict(vocab_size=50257, n_positions=CONTEXT, n_embd=32, n_head=2, n_layer=2, bos_token_id=50256,
             eos_token_id=50256)


def snapshot(hub: Path, repo_id: str) -> Path:
    """An empty snapshot folder of `repo_id` in huggingface_hub's cache layout, its revision the main branch."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    return repo / "snapshots" / revision


def openai_tokenizer_files(folder: Path) -> None:
    """OpenAI's BPE as the Hub serves it: vocab.json and merges.txt are the release's encoder.json and vocab.bpe."""
    release = fetch("gpt2_bpe")
    shutil.copy(release / "encoder.json", folder / "vocab.json")
    shutil.copy(release / "vocab.bpe", folder / "merges.txt")
    write_json(folder / "tokenizer_config.json", {"model_max_length": CONTEXT})


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    hub = home / "hub"
    stock = stock_gpt2(seed=1, **SHAPE)
    for repo_id in (OPENAI, LEGACY):
        folder = openai_style_folder(stock, snapshot(hub, repo_id))
        write_json(folder / "generation_config.json", {"bos_token_id": 50256, "eos_token_id": 50256})
        openai_tokenizer_files(folder)

    folder = openai_style_folder(stock, snapshot(hub, INCOMPLETE))
    state = load_file(str(folder / "model.safetensors"))
    del state["h.1.mlp.c_fc.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    folder = openai_style_folder(stock, snapshot(hub, EXTRA))
    state = load_file(str(folder / "model.safetensors"))
    state["h.0.attn.rotary.weight"] = torch.ones(3)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    folder = openai_style_folder(stock, snapshot(hub, RELU))
    config = json.loads((folder / "config.json").read_text())
    write_json(folder / "config.json", {**config, "activation_function": "relu"})

    write_json(snapshot(hub, BERT) / "config.json", {"model_type": "bert", "hidden_size": 32})
    return home


@pytest.fixture(autouse=True)
def offline_hub(hf_home, _isolated_hf_home, monkeypatch):
    """This module's cache, offline, for its subprocesses and for this process (huggingface_hub read its settings
    from the environment once, at import)."""
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))


def test_causal_lm_by_hub_id_equals_gpt2_lm_head_model(ids):
    stock = GPT2LMHeadModel.from_pretrained(OPENAI)
    ours = GPT2ScratchForCausalLM.from_pretrained(OPENAI)
    assert not ours.training and ours.config.qkv_bias and ours.config.context_length == CONTEXT
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)
    assert ours.config.name_or_path == OPENAI
    legacy = GPT2ScratchForCausalLM.from_pretrained(LEGACY)
    assert torch.equal(legacy.transformer.trf_blocks[1].att.W_value.bias,
                       ours.transformer.trf_blocks[1].att.W_value.bias)

    half = GPT2ScratchForCausalLM.from_pretrained(OPENAI, dtype=torch.bfloat16)
    stock_half = GPT2LMHeadModel.from_pretrained(OPENAI, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.out_head.weight is half.transformer.tok_emb.weight
    with torch.no_grad():
        torch.testing.assert_close(half(ids).logits, stock_half(ids).logits, atol=0.05, rtol=0)


def test_sequence_classifier_by_hub_id_equals_gpt2_for_sequence_classification(ids):
    ours = GPT2ScratchForSequenceClassification.from_pretrained(OPENAI, num_labels=3, pad_token_id=50256)
    stock = GPT2ForSequenceClassification.from_pretrained(OPENAI, num_labels=3, pad_token_id=50256).eval()
    assert ours.config.num_labels == 3 and ours.config.pad_token_id == 50256
    with torch.no_grad():
        stock.score.weight.copy_(ours.score.weight)  # the new head: the only tensor not from the checkpoint
        padded, mask = ids.clone(), torch.ones_like(ids)
        padded[1, 15:], mask[1, 15:] = 50256, 0  # stock GPT-2 finds the last real token by the padding id
        torch.testing.assert_close(ours(padded, attention_mask=mask).logits,
                                   stock(padded, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_convert_and_generate_by_hub_id(tmp_path, ids, capsys):
    out = tmp_path / "ours"
    assert cli(["convert", "--from-hf", OPENAI, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2_scratch"
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    stock = GPT2LMHeadModel.from_pretrained(OPENAI)
    converted = AutoModelForCausalLM.from_pretrained(out)
    assert type(converted) is GPT2ScratchForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)

    capsys.readouterr()
    assert cli(["generate", "--model", OPENAI, "--prompt", "To be, or not to be", "--temperature", "0",
                "--max-new-tokens", "6"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(OPENAI)
    prompt = tokenizer("To be, or not to be", return_tensors="pt")
    expected = stock.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=50256)
    assert capsys.readouterr().out.strip() == tokenizer.decode(expected[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("source, message", [
    (INCOMPLETE, "missing transformer.h.1.mlp.c_fc.weight"),
    (EXTRA, "unexpected h.0.attn.rotary.weight"),
    (RELU, "activation_function='relu'"),
    (BERT, "model_type is 'bert'"),
    ("someone/not-in-the-cache", "no Hub model of that id could be read"),
])
def test_wrong_sources_are_one_line_and_write_nothing(tmp_path, capsys, source, message):
    out = tmp_path / "out"
    assert cli(["convert", "--from-hf", source, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.iterdir())
    if source != "someone/not-in-the-cache":
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            GPT2ScratchForCausalLM.from_pretrained(source)


def test_a_gpt2_scratch_folder_is_not_a_stock_gpt2(tmp_path, capsys):
    demo = tmp_path / "demo"
    GPT2ScratchForCausalLM(tiny_config()).save_pretrained(demo)
    assert cli(["convert", "--from-hf", str(demo), "--out", str(tmp_path / "out")]) == 2
    assert "model_type is 'gpt2_scratch', not a stock GPT-2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli(["convert", "--to-hf", OPENAI, "--out", str(tmp_path / "out")]) == 2
    assert "model_type is 'gpt2', not a gpt2_scratch model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_gpt2_scratch_checkpoint_missing_a_tensor_is_refused(tmp_path):
    folder = tmp_path / "ours"
    GPT2ScratchForCausalLM(tiny_config()).save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["transformer.trf_blocks.0.ff.layers.2.bias"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensors .*transformer\.trf_blocks\.0\.ff\.layers\.2\.bias"):
        GPT2ScratchForCausalLM.from_pretrained(folder)


def test_scripts_refuse_a_wrong_source_before_reading_data(tmp_path):
    with pytest.raises(ValueError, match="--model_name_or_path someone/tiny-bert: model_type is 'bert'"):
        classify(classification_parser().parse_args(["--model_name_or_path", BERT, "--dataset", "missing.csv",
                                                     "--output_dir", str(tmp_path / "out")]))
    with pytest.raises(ValueError, match="brings its own shape: drop --emb_dim"):
        pretrain(pretraining_parser().parse_args(["--init_from", OPENAI, "--emb_dim", "64", "--output_dir",
                                                  str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def stock_tensors() -> dict[str, torch.Tensor]:
    return GPT2ScratchForCausalLM.from_pretrained(OPENAI).state_dict()


def test_classification_fine_tune_from_openai_trains_only_the_last_block(tmp_path):
    rows = [{"review": f"the play was {'great' if i % 2 else 'awful'} {i}", "sentiment": "pos" if i % 2 else "neg"}
            for i in range(40)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "sentiment"
    # In this process, as the script's run(): the three-line scripts run as subprocesses in their own test files.
    classify(classification_parser().parse_args([
        "--model_name_or_path", OPENAI, "--dataset", str(data), "--text_column", "review", "--label_column",
        "sentiment", "--train_layers", "last_block", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--output_dir", str(out)]))
    tuned = load_file(str(out / "model.safetensors"))
    start = stock_tensors()
    assert torch.equal(tuned["transformer.tok_emb.weight"], start["transformer.tok_emb.weight"])  # OpenAI's, frozen
    assert torch.equal(tuned["transformer.trf_blocks.0.att.W_query.bias"],
                       start["transformer.trf_blocks.0.att.W_query.bias"])
    assert not torch.equal(tuned["transformer.trf_blocks.1.ff.layers.0.weight"],
                           start["transformer.trf_blocks.1.ff.layers.0.weight"])
    assert len(AutoTokenizer.from_pretrained(out)) == 50257
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


def test_lora_instruction_tuning_and_continued_pretraining_from_openai(tmp_path):
    # In this process too, as the scripts' run().
    lora = tmp_path / "lora"
    instruct(instruction_parser().parse_args([
        "--model_name_or_path", OPENAI, "--tasks", "pluralise", "--task_train_size", "16", "--task_test_size", "2",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--lora_r", "2", "--max_new_tokens", "4",
        "--output_dir", str(lora), "--merge"]))
    assert json.loads((lora / "adapter_config.json").read_text())["base_model_name_or_path"] == OPENAI
    merged = GPT2ScratchForCausalLM.from_pretrained(lora / "merged")
    start = stock_tensors()
    assert torch.equal(merged.state_dict()["transformer.pos_emb.weight"], start["transformer.pos_emb.weight"])

    corpus = tmp_path / "hamlet.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 300)
    out = tmp_path / "continued"
    pretrain(pretraining_parser().parse_args([
        "--init_from", OPENAI, "--dataset", str(corpus), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-4", "--warmup_steps", "0", "--output_dir", str(out)]))
    config = json.loads((out / "config.json").read_text())
    assert (config["context_length"], config["vocab_size"], config["emb_dim"]) == (CONTEXT, 50257, 32)
    assert len(AutoTokenizer.from_pretrained(out)) == 50257  # OpenAI's BPE, not one trained on the corpus
    trained = load_file(str(out / "model.safetensors"))
    moved = {k: (trained[k] - start[k]).abs().max().item() for k in trained}
    assert max(moved.values()) < 1e-3  # two AdamW steps of 1e-4 from OpenAI's weights, not from a random init
    assert any(value > 0 for value in moved.values())
    assert "trained from openai-community/gpt2" in (out / "README.md").read_text()
