"""The tools GPT-2 users already run, each on a folder written by training/pretrain.py, with the real library:
the model card's snippet in a terminal, CTranslate2, lm-eval-harness, TRL + PEFT, transformers' Trainer and pipeline."""

from __future__ import annotations

import json
import math
import os
import pty
import re
import select
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import TEXT, assert_ok, run_without_package, tiny_pretraining, without_package
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt2_scratch.cli import main as cli
from gpt2_scratch.data import token_byte_lengths
from gpt2_scratch.pretraining import build_parser, language_model_evaluator, run

CONTEXT = 64
TINY = tiny_pretraining(context_length=CONTEXT, learning_rate="1e-2", warmup_steps=2, logging_steps=5, seed=7,
                        drop_rate=0.0)
SENTENCES = TEXT.split(". ")[:2]  # the two sentences TEXT repeats
TEST_TEXT = "To be, or not to be, that is the question. To take arms against a sea of troubles and end them.\n" * 3


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps, named by transformers' data arguments, with a test split."""
    data = tmp_path_factory.mktemp("data")
    for split, text in (("train", TEXT.replace(". ", ".\n") * 3), ("validation", TEXT[:600]), ("test", TEST_TEXT)):
        (data / f"{split}.txt").write_text(text)
    out = tmp_path_factory.mktemp("pretrained")
    run(build_parser().parse_args([
        "--train_file", str(data / "train.txt"), "--validation_file", str(data / "validation.txt"),
        "--test_file", str(data / "test.txt"), "--output_dir", str(out), "--max_steps", "12", *TINY]))
    return out


def run_on_terminal(command: list[str], env: dict[str, str], answer_after: str, timeout: float = 240
                    ) -> tuple[str, int]:
    """Run `command` on a pseudo-terminal, as in a shell or a notebook's terminal, and return what it printed and its
    exit status. After `answer_after` has been printed, a `[y/N]` question is answered "n" (before it, a question
    is left unanswered: transformers' own 15-second timeout then answers for it, and the output shows it)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(command[0], command, env)
    output, answered, deadline = b"", False, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 1.0)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        after = output.partition(answer_after.encode())[2]
        if not answered and b"[y/N]" in after:
            os.write(fd, b"n\n")
            answered = True
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return output.decode(errors="replace"), os.waitstatus_to_exitcode(status)


PROMPT = "Do you wish to run the custom code?"
WARNING = "You are using a model of type"


def test_model_card_snippet_runs_in_a_terminal_without_a_prompt_or_warning(pretrained):
    card = (pretrained / "README.md").read_text()
    assert "train.txt" in card, "the card names the --train_file"
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    repo_id = re.search(r'from_pretrained\("([^"]+)"', snippet).group(1)
    code = snippet.replace(f'"{repo_id}"', repr(str(pretrained)))
    # The control: the same folder without the flag is asked about and warned about, so the check below can fail.
    code += f"\nprint('CONTROL')\nAutoTokenizer.from_pretrained({str(pretrained)!r})\n"
    output, status = run_on_terminal(*without_package(code), answer_after="CONTROL")
    assert status == 0, output
    snippet_output, _, control_output = output.partition("CONTROL")
    assert PROMPT not in snippet_output and WARNING not in snippet_output, snippet_output
    assert PROMPT in control_output and WARNING in control_output, control_output


def test_saved_tokenizers_carry_stock_gpt2_settings(pretrained, tmp_path):
    assert cli(["convert", "--to-hf", str(pretrained), "--out", str(tmp_path / "stock")]) == 0
    for folder in (pretrained, tmp_path / "stock"):
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        assert settings["tokenizer_class"] == "GPT2Tokenizer" and settings["model_max_length"] == CONTEXT
        assert settings["unk_token"] == settings["eos_token"] == settings["bos_token"] == "<|endoftext|>"
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "stock").iterdir()}  # as on the Hub
    assert json.loads((pretrained / "metrics.json").read_text())["test_bits_per_byte"] > 0  # --test_file scored


def test_ctranslate2_greedy_tokens_equal_ours(pretrained, tmp_path):
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    stock = tmp_path / "stock"
    assert cli(["convert", "--to-hf", str(pretrained), "--out", str(stock)]) == 0
    TransformersConverter(str(stock)).convert(str(tmp_path / "ct2"))
    generator = ctranslate2.Generator(str(tmp_path / "ct2"), device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(stock)
    ours = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    for prompt in ("To be, or not", "whether 'tis nobler", "the slings"):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            expected = ours.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
        result = generator.generate_batch([tokenizer.convert_ids_to_tokens(ids)], max_length=30, sampling_topk=1,
                                          include_prompt_in_result=False)
        theirs = result[0].sequences_ids[0]
        assert theirs == expected, prompt


def exact_multiple(tokenizer, text: str, tokens: int) -> str:
    """A piece of `text` that tokenizes to exactly `tokens` tokens, as the piece of the whole text's tokens."""
    ids = tokenizer(text)["input_ids"]
    for start in range(len(ids) - tokens):
        piece = tokenizer.decode(ids[start : start + tokens])
        if tokenizer(piece)["input_ids"] == ids[start : start + tokens]:
            return piece
    raise AssertionError(f"no piece of {tokens} tokens round-trips")


@pytest.fixture(scope="module")
def lm_eval_hf():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    def rolling_bits_per_byte(folder: Path, documents: list[str], **options) -> tuple[list[float], HFLM]:
        lm = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=4, device="cpu", **options)
        requests = [Instance("loglikelihood_rolling", {}, (doc,), i) for i, doc in enumerate(documents)]
        logliks = lm.loglikelihood_rolling(requests, disable_tqdm=True)
        return [-ll / math.log(2) / len(doc.encode()) for ll, doc in zip(logliks, documents)], lm

    return rolling_bits_per_byte


def test_lm_eval_rolling_loglikelihood_equals_our_bits_per_byte(pretrained, lm_eval_hf):
    """lm-eval scores a document in windows of `max_length` predicted tokens, the first after an <|endoftext|>
    prefix, each next one with the previous window's last token as context. Our evaluator scores a token stream in
    windows of `block` tokens overlapping by one. On the stream <|endoftext|> + document with block = max_length + 1,
    and documents of a whole number of windows, both score the same tokens with the same context: equal."""
    window = 16
    tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=True)
    documents = [exact_multiple(tokenizer, TEXT, window), exact_multiple(tokenizer, TEXT[200:], 3 * window)]
    theirs, _ = lm_eval_hf(pretrained, documents, max_length=window)
    model = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    for document, bits_per_byte in zip(documents, theirs):
        stream = np.array([tokenizer.eos_token_id, *tokenizer(document)["input_ids"]])
        evaluate = language_model_evaluator(stream, token_byte_lengths(tokenizer), window + 1, 4, Accelerator(cpu=True))
        with torch.no_grad():
            assert evaluate(model)["eval/bits_per_byte"] == pytest.approx(bits_per_byte, rel=1e-5)


def test_lm_eval_bits_per_byte_agree_with_the_test_split_score(pretrained, lm_eval_hf):
    """With its defaults, lm-eval reads its window from the saved tokenizer (model_max_length) and scores the test
    file as one document; metrics.json scores the same text our way. The two schemes differ: lm-eval prefixes
    <|endoftext|>, so it also scores the first token and every token of its first window sits one position later
    with one token more of context; we also score the closing <|endoftext|> (no bytes, its loss counted); its
    windows predict 64 tokens and its last one re-reads a full window of context, ours predict 63 from a fresh
    start. Each token is scored once by both, only a token at either end by one side (1 of 147 each), and the rest
    differ only in how much earlier text they see: a few percent at most for a model whose loss barely depends on
    context beyond a phrase, as this one's. 5% (measured: 1.1%)."""
    (theirs,), lm = lm_eval_hf(pretrained, [TEST_TEXT])
    assert lm.max_length == CONTEXT
    ours = json.loads((pretrained / "metrics.json").read_text())["test_bits_per_byte"]
    assert theirs == pytest.approx(ours, rel=0.05)


def test_trl_sft_with_lora_reloads_with_auto_peft_model_without_the_package(pretrained, tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(pretrained, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=True)
    data = Dataset.from_dict({"prompt": ["Q: to be?\nA:", "Q: or not?\nA:"] * 4, "completion": [" yes", " no"] * 4})
    config = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                       learning_rate=5e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                       max_length=CONTEXT, dataloader_num_workers=0, bf16=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["W_query", "W_value"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trained = trainer.model.eval()
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n), "LoRA never trained"
    trainer.save_model(str(tmp_path / "adapter"))
    ids = tokenizer("Q: to be?\nA:", return_tensors="pt")
    with torch.no_grad():
        expected = trained.generate(**ids, max_new_tokens=8, do_sample=False)[0].tolist()
    result = run_without_package(
        f"""
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer
        model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / "adapter")!r}, trust_remote_code=True)
        ids = tokenizer("Q: to be?\\nA:", return_tensors="pt")
        assert model.eval().generate(**ids, max_new_tokens=8, do_sample=False)[0].tolist() == {expected!r}
        print("OK")
        """,
        cwd=tmp_path,
    )
    assert_ok(result)


def test_transformers_trainer_with_the_language_modeling_collator(pretrained, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(pretrained, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=True)
    data = Dataset.from_dict({"text": SENTENCES * 8}).map(lambda rows: tokenizer(rows["text"], truncation=True),
                                                          batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=2,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(4)),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before, (before, after)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    trained = trainer.model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert (tmp_path / "saved" / "modeling_gpt2_scratch.py").is_file()


def test_pipeline_batches_left_padded_prompts_like_one_at_a_time(pretrained):
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(pretrained), trust_remote_code=True)
    generator.tokenizer.padding_side = "left"
    prompts = ["To be", "whether 'tis nobler in the mind to suffer", "or not"]  # different lengths: padding
    options = dict(max_new_tokens=10, do_sample=False)
    one_at_a_time = [generator(prompt, **options)[0]["generated_text"] for prompt in prompts]
    batched = [out[0]["generated_text"] for out in generator(prompts, batch_size=3, **options)]
    assert batched == one_at_a_time
