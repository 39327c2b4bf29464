"""`gpt2-scratch explore`: every number the page shows equals the model's own (checked on the plain functions and,
in a real Chromium, on the page the CLI serves for a folder pretraining wrote); a stock GPT-2 id in an offline cache,
also as a Space's app.py; one-line errors for a model that cannot be loaded and a port in use."""

from __future__ import annotations

import hashlib
import json
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub.constants
import pytest
import tomllib
import torch
from conftest import (
    ROOT,
    TEXT,
    assert_ok,
    free_port,
    make_tokenizer,
    openai_style_folder,
    stock_gpt2,
    tiny_config,
    training_script,
)
from transformers import AutoTokenizer, set_seed

from gpt2_scratch import GPT2ScratchForCausalLM
from gpt2_scratch.cli import main as cli
from gpt2_scratch.explore import Explorer, Views, load_explorer, training_record, visible, warpers

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder training/pretrain.py wrote: 4 steps, validation every 2, a TensorBoard log and metrics.json."""
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "hamlet.txt").write_text(TEXT.replace(". ", ".\n") + "\n")
    make_tokenizer().save_pretrained(corpus / "tokenizer")
    out = tmp_path_factory.mktemp("trained")
    assert_ok(training_script("pretrain.py", [
        "--dataset", str(corpus / "hamlet.txt"), "--tokenizer", str(corpus / "tokenizer"), "--output_dir", str(out),
        "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1", "--preset", "cpu-1m", "--context_length",
        "32", "--emb_dim", "32", "--n_heads", "2", "--n_layers", "2", "--per_device_train_batch_size", "4",
        "--seed", "7"]))
    return out


@pytest.fixture(scope="module")
def explorer() -> Explorer:
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(tiny_config(bos_token_id=0, eos_token_id=0, context_length=24))
    return Explorer(model, make_tokenizer(), "tiny")


def reference(model, ids: tuple[int, ...]):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_attentions=True)


def test_every_view_is_the_models_own_numbers(explorer):
    tokenizer, model = explorer.tokenizer, explorer.model
    prompt = "To be, or not\tto be é\n"
    encoded = explorer.encode(prompt)
    assert list(encoded.ids) == tokenizer(prompt)["input_ids"] and encoded.dropped == 0
    tokens = explorer.tokens(encoded.ids)
    assert [t.token for t in tokens] == tokenizer.convert_ids_to_tokens(list(encoded.ids))
    assert "".join(t.text for t in tokens).startswith("To·be,·or·not→to·be·")
    assert visible(b"\xc3") == "<0xC3>" and visible("\x07") == "<0x07>" and visible("a\n") == "a↵"

    out = reference(model, encoded.ids)
    logits = out.logits[0, -1]
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 5, 1.0), (1.5, 0, 0.6), (0.5, 3, 0.9)):
        expected = torch.softmax(warpers(temperature, top_k, top_p)(torch.tensor([encoded.ids]), logits[None])[0], -1)
        candidates = explorer.next_token(encoded.ids, temperature, top_k, top_p)
        assert candidates[0].id == int(logits.argmax())
        for c in candidates:
            assert c.probability == pytest.approx(float(torch.softmax(logits, -1)[c.id]), abs=1e-6)
            assert c.sampled_probability == pytest.approx(float(expected[c.id]), abs=1e-6)
            assert c.kept == (float(expected[c.id]) > 0)
        if top_k:
            assert sum(c.kept for c in candidates) <= top_k

    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(explorer.attention(encoded.ids, layer), out.attentions[layer][0], atol=1e-5, rtol=0)

    lens = explorer.logit_lens(encoded.ids)
    assert [r.layer for r in lens] == ["embeddings", "block 1", "block 2"]
    assert lens[-1].id == int(logits.argmax())
    assert lens[-1].probability == pytest.approx(float(torch.softmax(logits, -1).max()), abs=1e-6)
    block_output = {}  # the first block's output, read by a hook: the lens of "block 1" is its head(final_norm(.))
    hook = model.transformer.trf_blocks[0].register_forward_hook(lambda m, i, o: block_output.update({0: o[0]}))
    reference(model, encoded.ids)
    hook.remove()
    head = model.out_head(model.transformer.final_norm(block_output[0][0, -1]))
    assert lens[1].id == int(head.argmax())


def test_sampling_and_step_by_step_draw_what_generate_draws(explorer):
    model, ids = explorer.model, explorer.encode(PROMPT).ids
    settings = dict(temperature=0.9, top_k=20, top_p=0.95)
    steps = explorer.step_by_step(ids, 6, seed=3, **settings)
    with torch.no_grad():
        # the first generate() in a process times its decode kernels on torch.randn inputs, drawing from the RNG
        model.generate(torch.tensor([ids]), max_new_tokens=1, pad_token_id=0)
        set_seed(3)
        out = model.generate(torch.tensor([ids]), do_sample=True, max_new_tokens=6, pad_token_id=0, eos_token_id=None,
                             output_scores=True, output_logits=True, return_dict_in_generate=True, **settings)
    assert [s.id for s in steps] == out.sequences[0, len(ids):].tolist()
    for n, step in enumerate(steps):
        assert step.cache_length == len(ids) + n
        assert step.sampled_probability == pytest.approx(float(torch.softmax(out.scores[n][0], -1)[step.id]), abs=1e-5)
        assert step.probability == pytest.approx(float(torch.softmax(out.logits[n][0], -1)[step.id]), abs=1e-5)
    assert explorer.sample(ids, seed=3, **settings) == steps[0].id
    room = explorer.context - len(ids)
    assert len(explorer.step_by_step(ids, room + 5, seed=0, **settings)) == room


def test_long_prompts_keep_the_last_context_tokens(explorer):
    ids = explorer.tokenizer(TEXT)["input_ids"]
    encoded = explorer.encode(TEXT)
    assert encoded.ids == tuple(ids[-explorer.context:]) and encoded.dropped == len(ids) - explorer.context
    assert explorer.encode("").ids == ()


def test_a_long_prompts_heatmap_shows_its_last_96_tokens(base):
    explorer = load_explorer(str(base))
    heatmap, heads = Views(explorer).attention(TEXT, 1, 2)
    ids = explorer.encode(TEXT).ids
    assert len(ids) == 256 and "the last 96 of the 256 tokens" in heatmap
    weights = [float(w) for w in re.findall(r'data-w="([0-9.]+)"', heatmap)]
    expected = reference(explorer.model, ids).attentions[1][0, 2, -96:, -96:]
    assert weights == pytest.approx([float(expected[q, k]) for q in range(96) for k in range(q + 1)], abs=1e-5)
    assert heads.count("<img") == explorer.config.num_attention_heads


@pytest.fixture
def hub_id(tmp_path, monkeypatch) -> str:
    """A random stock GPT-2 in a Hugging Face cache (OpenAI's layout), offline."""
    repo_id = "someone/random-gpt2"
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    folder = openai_style_folder(stock_gpt2(seed=2), repo / "snapshots" / revision)
    make_tokenizer().save_pretrained(folder)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo_id


def test_a_stock_gpt2_id_from_an_offline_cache(hub_id):
    explorer = load_explorer(hub_id)
    assert explorer.folder is None and explorer.name == hub_id
    stock = stock_gpt2(seed=2)
    stock.set_attn_implementation("eager")
    ids = explorer.encode(PROMPT).ids
    with torch.no_grad():
        expected = stock(torch.tensor([ids]), output_attentions=True)
    assert explorer.next_token(ids, 1.0, 0, 1.0)[0].id == int(expected.logits[0, -1].argmax())
    assert explorer.logit_lens(ids)[-1].id == int(expected.logits[0, -1].argmax())
    torch.testing.assert_close(explorer.attention(ids, 1), expected.attentions[1][0], atol=1e-5, rtol=0)


def test_an_adapter_is_merged_into_the_model_the_page_shows(base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from gpt2_scratch.lora import DEFAULT_TARGET_MODULES

    torch.manual_seed(1)
    tuned = get_peft_model(GPT2ScratchForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=list(DEFAULT_TARGET_MODULES), init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "adapter")
    explorer = load_explorer(str(base), str(tmp_path / "adapter"))
    assert explorer.name == f"{base} + adapter {tmp_path / 'adapter'}"
    ids = explorer.encode(PROMPT).ids
    reloaded = PeftModel.from_pretrained(GPT2ScratchForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor([ids])).logits[0, -1]
    plain = reference(GPT2ScratchForCausalLM.from_pretrained(base).eval(), ids).logits[0, -1]
    assert not torch.allclose(logits, plain, atol=1e-3)  # the adapter changes the prediction
    torch.testing.assert_close(explorer.forward(ids).logits, logits, atol=1e-5, rtol=1e-5)


def test_unloadable_model_and_busy_port_are_one_line(tmp_path, base, capsys):
    (tmp_path / "broken").mkdir()
    shutil.copy(base / "config.json", tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    make_tokenizer().save_pretrained(tmp_path / "broken")
    for model, message in ((tmp_path / "nothing", "not a model folder"),
                           (tmp_path / "broken", "the model cannot be loaded")):
        assert cli(["explore", "--model", str(model), "--port", str(free_port())]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli(["explore", "--model", str(base), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port} on 127.0.0.1" in err and len(err.strip().splitlines()) == 1, err


def numbers(page, selector: str, attribute: str) -> list[float]:
    return page.eval_on_selector_all(selector, f"els => els.map(e => +e.getAttribute('{attribute}'))")


def set_slider(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


@pytest.fixture
def served(trained):
    """`gpt2-scratch explore --model <trained folder>` as a user runs it, in a process of its own, and the URL it
    printed; stopped (SIGTERM) afterwards."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gpt2_scratch.cli", "explore", "--model", str(trained), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed, deadline = "", time.monotonic() + 180  # only against a hang: the page is up in seconds
    while "http://" not in printed and server.poll() is None and time.monotonic() < deadline:
        if select.select([server.stdout], [], [], 1.0)[0]:
            printed += server.stdout.readline()
    try:
        assert f"at http://127.0.0.1:{port}/" in printed, printed
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_page_in_chromium_shows_the_models_numbers_and_the_run(served, trained, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Chromium is missing: `make test` installs it (apt-get install chromium)"
    curves, metrics = training_record(trained)  # what the run view draws, read from the files pretraining wrote
    assert metrics == json.loads((trained / "metrics.json").read_text())
    assert [step for step, _ in curves["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in curves["eval/loss"]] == [2, 4]
    assert curves["eval/loss"][-1][1] == pytest.approx(metrics["loss"], rel=1e-5)
    assert training_record(None) == ({}, {})
    model = GPT2ScratchForCausalLM.from_pretrained(trained).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    ids = tuple(tokenizer(PROMPT)["input_ids"])
    out = reference(model, ids)
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda request: requests.append(request.url))
        page.goto(served)
        page.wait_for_selector("#gx-tokens .gx-token")

        page.fill("#gx-prompt textarea", PROMPT)
        page.click("#gx-run")
        page.wait_for_function(f"document.querySelectorAll('#gx-tokens .gx-token').length == {len(ids)}")
        shown = page.eval_on_selector_all("#gx-tokens .gx-token",
                                          "els => els.map(e => [+e.dataset.id, e.querySelector('.gx-text').innerText])")
        assert [i for i, _ in shown] == list(ids)
        assert [text for _, text in shown] == [visible(tokenizer.decode([i])) for i in ids]
        top = page.locator("#gx-next tr.gx-candidate").first
        assert int(top.get_attribute("data-id")) == int(out.logits[0, -1].argmax())
        assert float(top.get_attribute("data-p")) == pytest.approx(float(torch.softmax(out.logits[0, -1], -1).max()),
                                                                   abs=1e-6)
        lens = page.locator("#gx-lens tr.gx-lens-row").last
        assert int(lens.get_attribute("data-id")) == int(out.logits[0, -1].argmax())

        before = numbers(page, "#gx-heatmap rect[data-w]", "data-w")
        expected = out.attentions[0][0, 0]
        assert before == pytest.approx([float(expected[q, k]) for q in range(len(ids)) for k in range(q + 1)],
                                       abs=1e-5)
        set_slider(page, "gx-layer", 1)
        set_slider(page, "gx-head", 1)
        page.wait_for_selector("#gx-heatmap svg[data-layer='1'][data-head='1']")
        after = numbers(page, "#gx-heatmap rect[data-w]", "data-w")
        expected = out.attentions[1][0, 1]
        assert after != before
        assert after == pytest.approx([float(expected[q, k]) for q in range(len(ids)) for k in range(q + 1)],
                                      abs=1e-5)
        assert page.locator("#gx-heads .gx-head img").count() == model.config.num_attention_heads

        bars = numbers(page, "#gx-next tr.gx-candidate", "data-q")
        set_slider(page, "gx-temperature", 2.5)
        page.wait_for_function("document.querySelector('#gx-next th:last-child').innerText.includes('temperature 2.5')")
        warped = numbers(page, "#gx-next tr.gx-candidate", "data-q")
        assert warped != bars
        shown_ids = numbers(page, "#gx-next tr.gx-candidate", "data-id")
        distribution = Explorer.sampling_distribution(ids, out.logits[0, -1], 2.5, 0, 1.0)
        assert warped == pytest.approx([float(distribution[int(i)]) for i in shown_ids], abs=1e-6)

        page.fill("#gx-seed input", "5")
        page.click("#gx-sample-button")
        page.wait_for_selector("#gx-sample .gx-sample")
        assert int(page.get_attribute("#gx-sample .gx-sample", "data-id")) == \
            int(torch.multinomial(distribution, 1, generator=torch.Generator().manual_seed(5)))

        points = page.eval_on_selector_all("#gx-run-record circle title", "els => els.map(e => e.textContent)")
        for tag in ("train/loss", "eval/loss"):
            assert page.locator(f"#gx-run-record polyline[data-tag='{tag}']").count() == 1
            assert [f"{tag} step {step}: {value:.4f}" for step, value in curves[tag]] == \
                [point for point in points if point.startswith(tag)]
        assert page.inner_text("#gx-run-record tr[data-metric='bits_per_byte']").split()[-1] == \
            f"{metrics['bits_per_byte']:.4f}"
        page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)
        assert (tmp_path / "explore.png").stat().st_size > 20_000

        page.fill("#gx-prompt textarea", TEXT)
        page.click("#gx-run")
        page.wait_for_selector("#gx-truncated")
        assert f"keep the last {model.config.context_length} tokens" in page.inner_text("#gx-truncated")
        page.fill("#gx-prompt textarea", "")
        page.click("#gx-run")
        page.wait_for_selector("#gx-tokens .gx-message")
        assert "Type a prompt" in page.inner_text("#gx-tokens")
        browser.close()
    assert requests and all(url.startswith(served) or url.startswith("data:") for url in requests), \
        [url for url in requests if not url.startswith(served)]
    with pytest.raises(urllib.error.HTTPError):  # the server hands out no file the page did not make
        urllib.request.urlopen(f"{served}gradio_api/file={trained / 'config.json'}", timeout=30)


def test_the_space_runs_from_its_two_files_and_a_copy_of_the_package(hub_id, tmp_path, monkeypatch):
    """A Space holds app.py, requirements.txt and the gpt2_scratch/ folder; app.py builds the page for the model its
    variable names, importing the copied package (Python looks beside the script before site-packages)."""
    space = tmp_path / "space"
    shutil.copytree(ROOT / "space", space)
    shutil.copytree(ROOT / "gpt2_scratch", space / "gpt2_scratch", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("GPT2_SCRATCH_MODEL", hub_id)
    code = ("import runpy, gpt2_scratch; app = runpy.run_path('app.py', run_name='space')['app']; "
            "print(gpt2_scratch.__file__); print(app.title)")
    done = subprocess.run([sys.executable, "-c", code], cwd=space, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    package, title = done.stdout.strip().splitlines()[-2:]
    assert Path(package).parent == space / "gpt2_scratch" and hub_id in title

    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = [line for line in (space / "requirements.txt").read_text().splitlines()
              if line and not line.startswith(("#", "--"))]
    assert listed[0] == "torch==2.13.0"  # the CPU build, from the index line above it
    assert listed[1:] == [d for d in wanted["dependencies"] if not d.startswith("torch")] + \
        wanted["optional-dependencies"]["explore"]
