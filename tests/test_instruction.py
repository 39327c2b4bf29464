"""training/finetune_instruction_lora.py on tiny models: prompt masking, the task generator, adapter and merged
reloads in a fresh process, 2 processes, the chat CLI, bad input."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    TWO_PROCESSES,
    assert_clear_failure,
    assert_ok,
    reset_accelerate,
    run_without_package,
    training_script,
)
from transformers import AutoTokenizer

from gpt2_scratch.instruction import PROMPT_NO_INPUT, build_parser, encode, format_prompt, run, shared_prefix_loss
from gpt2_scratch.tasks import FAMILIES, make_tasks

TINY = ["--tasks", "pluralise", "add", "--task_train_size", "24", "--task_test_size", "3",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--lora_r", "4", "--seed", "5",
        "--max_new_tokens", "8", "--logging_steps", "2"]


def lora(base: Path, out: Path, *extra: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    return training_script("finetune_instruction_lora.py", ["--model_name_or_path", str(base), "--output_dir",
                                                            str(out), *TINY, *extra], launcher)


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    result = lora(base, out, "--max_steps", "6", "--merge")
    assert_ok(result)
    return out


def test_the_alpaca_template():
    assert format_prompt("Sort the words.", "b, a") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort the words.\n\n### Input:\nb, a\n\n### Response:\n")
    assert format_prompt("Tell me a joke.") == format_prompt("Tell me a joke.", "  ") == PROMPT_NO_INPUT.format(
        instruction="Tell me a joke.")


def test_masking_puts_minus_100_exactly_on_the_prompt(base):
    tokenizer = AutoTokenizer.from_pretrained(base)
    example = {"instruction": "Give the plural of the noun.", "input": "fox", "output": "foxes"}
    prompt = tokenizer(format_prompt("Give the plural of the noun.", "fox"))["input_ids"]
    response = tokenizer("foxes")["input_ids"]
    masked = encode(example, tokenizer, mask_prompt=True)
    assert masked["input_ids"] == prompt + response + [tokenizer.eos_token_id]
    assert masked["labels"] == [-100] * len(prompt) + response + [tokenizer.eos_token_id]
    assert masked["prompt_length"] == len(prompt)
    assert encode(example, tokenizer, mask_prompt=False)["labels"] == masked["input_ids"]


SAME_PROMPT = [("Add the two numbers.", "2 + 3", "5"), ("Add the two numbers.", "2 + 3", "five")]
MIXED = [("Add the two numbers.", "2 + 3", "5"), ("Give the plural of the noun.", "fox", "foxes"),
         ("Sort the words alphabetically.", "pear, apple, fig", "apple, fig, pear"), ("Tell me a joke.", "", "No.")]


@pytest.mark.parametrize("records,mask_prompt", [(MIXED, True), (SAME_PROMPT, True), (MIXED, False)],
                         ids=["shared preamble", "whole prompt shared", "unmasked: nothing shared"])
def test_shared_prefix_loss_equals_the_plain_loss_and_its_gradients(base, records, mask_prompt):
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq

    from gpt2_scratch import GPT2ScratchForCausalLM
    from gpt2_scratch.lora import lora_config

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    model = GPT2ScratchForCausalLM.from_pretrained(base)
    args = build_parser().parse_args(["--model_name_or_path", str(base), "--output_dir", "unused",
                                      "--train_embeddings", "--lora_dropout", "0"])
    model = get_peft_model(model, lora_config(args, "CAUSAL_LM", vocab_size=model.config.vocab_size)).train()
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # zero at the start of training; random here so every adapter gets a gradient
            torch.nn.init.normal_(parameter, std=0.05)
    rows = [encode({"instruction": i, "input": x, "output": o}, tokenizer, mask_prompt) for i, x, o in records]
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(
        [{k: row[k] for k in ("input_ids", "attention_mask", "labels")} for row in rows])

    def loss_and_gradients(compute):
        model.zero_grad()
        loss = compute(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = loss_and_gradients(lambda m, b: m(**b).loss)
    shared, shared_grads = loss_and_gradients(shared_prefix_loss)
    assert shared == pytest.approx(plain, rel=1e-6)
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_task_generator_is_seeded_correct_and_holds_out_its_test_instances():
    tasks = make_tasks(list(FAMILIES), 300, 20, seed=1)
    assert tasks["train"].to_dict() == make_tasks(list(FAMILIES), 300, 20, seed=1)["train"].to_dict()
    seen = set(zip(tasks["train"]["instruction"], tasks["train"]["input"]))
    assert not any((r["instruction"], r["input"]) in seen for r in tasks["test"])
    checks = {
        "upper": lambda i, o: o == i.upper(), "lower": lambda i, o: o == i.lower(),
        "title": lambda i, o: o == i.title(), "reverse_words": lambda i, o: o.split() == i.split()[::-1],
        "count_words": lambda i, o: int(o) == len(i.split()),
        "sort_words": lambda i, o: o.split(", ") == sorted(i.split(", ")),
        "add": lambda i, o: int(o) == eval(i), "subtract": lambda i, o: int(o) == eval(i),  # noqa: S307 - our text
        "pluralise": lambda i, o: o.endswith("s"), "first_sentence": lambda i, o: i.startswith(o) and o.endswith("."),
    }
    for row in tasks["test"]:
        assert checks[row["task"]](row["input"], row["output"]), row
    assert set(tasks["test"]["task"]) == set(FAMILIES)
    with pytest.raises(ValueError, match="unknown task families \\['poetry'\\]"):
        make_tasks(["poetry"], 1, 1, 0)


def test_task_weights_give_a_family_more_training_instances_and_leave_the_test_split_alone():
    plain = make_tasks(["add", "upper", "pluralise"], 40, 5, seed=3)
    weighted = make_tasks(["add", "upper", "pluralise"], 40, 5, seed=3, weights={"add": 2.5, "pluralise": 0.5})
    assert weighted["test"].to_dict() == plain["test"].to_dict()
    counts = {task: weighted["train"]["task"].count(task) for task in ("add", "upper", "pluralise")}
    assert counts == {"add": 100, "upper": 40, "pluralise": 20}
    held_out = set(zip(weighted["test"]["instruction"], weighted["test"]["input"]))
    assert not held_out & set(zip(weighted["train"]["instruction"], weighted["train"]["input"]))
    with pytest.raises(ValueError, match="weights given for \\['upper'\\], which are not among the chosen"):
        make_tasks(["add"], 4, 1, 0, weights={"upper": 2})
    with pytest.raises(ValueError, match="task weights must be positive"):
        make_tasks(["add"], 4, 1, 0, weights={"add": 0})


def test_task_weights_on_other_data_are_refused(base, tmp_path):
    from gpt2_scratch.instruction import load_instructions

    args = build_parser().parse_args(["--model_name_or_path", str(base), "--output_dir", str(tmp_path),
                                      "--dataset_name", "chatterbot", "--task_weights", "add=2"])
    with pytest.raises(ValueError, match="--task_weights weighs the generated task families; it does nothing for "
                                         "chatterbot"):
        load_instructions(args)


def test_a_malformed_task_weight_exits_2(base, tmp_path):
    result = lora(base, tmp_path / "out", "--task_weights", "add:4", "--max_steps", "1")
    assert_clear_failure(result, "--task_weights add:4: expected FAMILY=NUMBER, e.g. add=4", tmp_path / "out")


def test_adapter_output_folder(tuned, base):
    config = json.loads((tuned / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 4
    assert (tuned / "adapter_model.safetensors").is_file() and (tuned / "merged" / "config.json").is_file()
    card = (tuned / "README.md").read_text()
    assert f"base_model: {base.resolve()}" in card and "library_name: peft" in card
    predictions = [json.loads(line) for line in (tuned / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and set(predictions[0]) == {"task", "instruction", "input", "reference", "response"}
    report = json.loads((tuned / "metrics.json").read_text())["test"]
    assert set(report) == {"overall", "add", "pluralise"} and report["add"]["examples"] == 3
    assert 0 <= report["overall"]["exact_match"] <= 1 and 0 <= report["overall"]["rouge_l"] <= 1


def modulo_2_records(folder: Path) -> list[str]:
    """Train and test files of "What is the number modulo 2?" for 10-99: 20 held-out numbers (10 even, 10 odd), the
    other 70 three times each for training."""
    numbers = list(range(10, 100))
    random.Random(0).shuffle(numbers)
    lines = [json.dumps({"instruction": "What is the number modulo 2?", "input": str(n), "output": str(n % 2)})
             for n in numbers]
    train = write_jsonl(folder / "train.jsonl", lines[20:] * 3)
    test = write_jsonl(folder / "test.jsonl", lines[:20])
    return ["--train_file", str(train), "--test_file", str(test), "--per_device_train_batch_size", "8",
            "--learning_rate", "3e-2", "--warmup_steps", "0", "--lora_r", "4", "--train_embeddings", "--seed", "5",
            "--max_new_tokens", "2", "--max_steps", "30"]


def test_instruction_tuning_raises_exact_match_above_the_untuned_model(base, tmp_path):
    """30 seeded LoRA steps on "What is the number modulo 2?": held-out exact match 0.5 against the untuned model's
    0.0, on the same 20 instances, scored by the same `evaluate_generation`. The tiny random base learns the answer's
    form (one digit, then eos), not parity: it answers 1 throughout, right on the 10 odd numbers; with two balanced
    answers any such answer scores 0.5 (with count_words' eight the score hangs on which number it settles on). With
    the shared loop climbing the loss (`loss = -self.compute_loss(...)` in `TrainingLoop.micro_step`) the tuned
    model scores 0.0."""
    from gpt2_scratch import GPT2ScratchForCausalLM
    from gpt2_scratch.data import check_data_arguments
    from gpt2_scratch.instruction import evaluate_generation, load_instructions, tokenize_instructions
    from gpt2_scratch.training import make_accelerator

    settings = ["--model_name_or_path", str(base), *modulo_2_records(tmp_path)]
    result = training_script("finetune_instruction_lora.py", [*settings, "--output_dir", str(tmp_path / "tuned")])
    assert_ok(result)
    tuned = json.loads((tmp_path / "tuned" / "metrics.json").read_text())["test"]["overall"]
    tuned_rows = [json.loads(line) for line in (tmp_path / "tuned" / "eval_predictions.jsonl").read_text().splitlines()]

    args = build_parser().parse_args([*settings, "--output_dir", str(tmp_path / "untuned")])
    check_data_arguments(args)
    reset_accelerate()
    accelerator = make_accelerator(args)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    model = GPT2ScratchForCausalLM.from_pretrained(base).eval()
    test = tokenize_instructions(load_instructions(args)["test"], tokenizer, model.config.context_length, True,
                                 "test", accelerator)
    untuned, rows = evaluate_generation(model, tokenizer, test, args, accelerator)
    assert [(r["input"], r["reference"]) for r in rows] == [(r["input"], r["reference"]) for r in tuned_rows]
    assert tuned["examples"] == untuned["overall"]["examples"] == 20
    assert tuned["exact_match"] >= untuned["overall"]["exact_match"] + 0.4, (tuned, untuned["overall"], tuned_rows)


def answered(tuned: Path) -> dict:
    """A test record with a non-empty answer, to compare with answers produced elsewhere."""
    rows = [json.loads(line) for line in (tuned / "eval_predictions.jsonl").read_text().splitlines()]
    return next(row for row in rows if row["response"])


def test_adapter_and_merged_model_reload_in_a_fresh_process(tuned, base):
    first = answered(tuned)
    prompt = format_prompt(first["instruction"], first["input"])
    result = run_without_package(
        f"""
        import torch
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(tuned)!r})
        ids = tokenizer({prompt!r}, return_tensors="pt")["input_ids"]
        base = AutoModelForCausalLM.from_pretrained({str(base)!r}, trust_remote_code=True)
        plain = base(ids).logits
        adapter = PeftModel.from_pretrained(base, {str(tuned)!r}).eval()
        auto = AutoPeftModelForCausalLM.from_pretrained({str(tuned)!r}, trust_remote_code=True).eval()
        merged = AutoModelForCausalLM.from_pretrained({str(tuned / "merged")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            a, b, m = adapter(ids).logits, auto(ids).logits, merged(ids).logits
        assert torch.equal(a, b), "adapter loaded two ways differs"
        assert torch.allclose(a, m, atol=1e-5), (a - m).abs().max()
        assert not torch.allclose(a, plain, atol=1e-3), "the adapter changed nothing"
        out = auto.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        row = out[0, ids.shape[1]:].tolist()
        row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        print("RESPONSE=" + repr(tokenizer.decode(row)))
        """,
        cwd=tuned,
    )
    assert_ok(result)
    assert f"RESPONSE={first['response']!r}" in result.stdout  # the evaluation's answer, reproduced


def test_trained_embeddings_stay_tied_to_the_output_head_through_reload_and_merge(base, tmp_path):
    result = lora(base, tmp_path, "--max_steps", "4", "--learning_rate", "1e-2", "--train_embeddings", "--merge")
    assert_ok(result)
    # Rank 4 on q, k, v, out (48 -> 48) and the MLP (48 -> 192 -> 48) of 2 blocks, plus the 320 x 48 embedding once:
    # the tied head adds no numbers of its own.
    lora_numbers = 2 * 4 * (4 * (48 + 48) + 2 * (48 + 192))
    assert f"trainable parameters: {lora_numbers + 320 * 48:,} of" in result.stdout
    assert "token embeddings trained" in (tmp_path / "README.md").read_text()
    result = run_without_package(
        f"""
        import torch
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(base)!r}, trust_remote_code=True)
        merged = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}, trust_remote_code=True).eval()
        auto = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        embedding = merged.get_input_embeddings().weight
        assert not torch.allclose(embedding, base.get_input_embeddings().weight), "the embeddings did not train"
        with torch.no_grad():
            # In the adapter model the head reads hidden states with the trained embedding, row for row.
            trained = auto.get_input_embeddings()(torch.arange(embedding.shape[0]))
            hidden = torch.randn(3, embedding.shape[1])
            assert torch.allclose(auto.get_output_embeddings()(hidden), hidden @ trained.T, atol=1e-5)
            assert torch.allclose(trained, embedding, atol=1e-6), "merging changed the embedding"
            ids = torch.arange(20)[None]
            assert torch.allclose(auto(ids).logits, merged(ids).logits, atol=1e-5)
        """,
        cwd=tmp_path,
    )
    assert_ok(result)


def test_chat_streams_the_same_answer_as_the_evaluation(tuned, base):
    first = answered(tuned)
    result = subprocess.run(
        [sys.executable, "-m", "gpt2_scratch.cli", "chat", "--model", str(base), "--adapter", str(tuned),
         "--max-new-tokens", "8"], input=f"{first['instruction']} || {first['input']}\n\n", capture_output=True,
        text=True, cwd=ROOT, timeout=300)
    assert_ok(result)
    assert result.stdout.startswith("instruction> " + first["response"]), result.stdout


def test_two_processes_with_accelerate_launch(base, tmp_path):
    result = lora(base, tmp_path, "--max_steps", "2", launcher=TWO_PROCESSES)
    assert_ok(result)
    assert len((tmp_path / "eval_predictions.jsonl").read_text().splitlines()) == 6  # both halves gathered


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = '{"instruction": "Say hi.", "input": "", "output": "hi"}'
BAD_RECORDS = {
    "malformed": ([GOOD, GOOD, '{"instruction": "Say hi.", "output": '], "records.jsonl, line 3: not valid JSON"),
    "no instruction": ([GOOD, '{"prompt": "Say hi.", "output": "hi"}'],
                       "records.jsonl, record 2: no 'instruction' field"),
    "empty output": ([GOOD, '{"instruction": "Say hi.", "output": "  "}'], "record 2: empty 'output'"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_records_are_refused_with_file_and_line(base, tmp_path, case):
    lines, message = BAD_RECORDS[case]
    data = write_jsonl(tmp_path / "records.jsonl", lines)
    with pytest.raises(ValueError, match=re.escape(message)):
        run(build_parser().parse_args(["--model_name_or_path", str(base), "--dataset", str(data), "--output_dir",
                                       str(tmp_path / "out"), "--max_steps", "1"]))


def test_records_longer_than_the_context_are_skipped_and_counted(base, tmp_path):
    records = [json.dumps({"instruction": f"Say {w}.", "output": w}) for w in ("hi", "yo", "hey", "ho", "ha")]
    records.append(json.dumps({"instruction": "Say everything.", "output": "word " * 300}))
    data = write_jsonl(tmp_path / "records.jsonl", records)
    test = write_jsonl(tmp_path / "test.jsonl", [GOOD])
    result = training_script("finetune_instruction_lora.py", [
        "--model_name_or_path", str(base), "--train_file", str(data), "--test_file", str(test), "--output_dir",
        str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "2"])
    assert_ok(result)
    assert "train: skipped 1 of 6 records longer than the context of 256 tokens" in result.stdout


def test_a_record_file_that_does_not_exist_exits_2(base, tmp_path):
    result = lora(base, tmp_path / "out", "--dataset", str(tmp_path / "missing.jsonl"), "--max_steps", "1")
    assert_clear_failure(result, "missing.jsonl: no such file", tmp_path / "out")
