"""How long the explorer page takes to refresh every view for a new 64-token prompt (tokens, next-token bars,
attention heatmap and the overview of a layer's heads, logit lens, 8 steps of step-by-step decoding): the handler
the page calls on "Run", timed in-process, beside a bare forward pass with attentions (its peer: the model's own
share of the work); and, for the demo model, the whole round trip in Chromium (click Run until all six views show
the new prompt), after which the page is saved as a screenshot (docs/explore.png is one).

    .venv/bin/python benchmarks/bench_explore.py --screenshot docs/explore.png    # needs runs/demo (`make demo`)

Targets (issue 37): the demo model <= 0.5 s, gpt2-small (random weights, OpenAI's tokenizer) <= 2 s, on 2 cores.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from gpt2_scratch.explore import Explorer, Views, load_explorer
from gpt2_scratch.loading import quiet_library_progress
from gpt2_scratch.sources import shakespeare_text
from gpt2_scratch.tokenizer import load_gpt2_tokenizer

TOKENS = 64


def prompts(explorer: Explorer, count: int) -> list[str]:
    """`count` different texts of exactly TOKENS tokens (so no view is served from the forward cache)."""
    ids = explorer.tokenizer(shakespeare_text()[:200_000])["input_ids"]
    out = []
    for start in range(0, len(ids), 997):
        text = explorer.tokenizer.decode(ids[start:start + TOKENS])
        if len(explorer.encode(text).ids) == TOKENS:
            out.append(text)
        if len(out) == count:
            return out
    raise SystemExit("could not cut enough 64-token prompts")


def measure(explorer: Explorer, repeats: int) -> tuple[float, float, float]:
    """Median seconds of a full refresh (wall clock and this process's CPU time, which other processes on a shared
    machine do not inflate) and of a bare forward with attentions, on fresh prompts."""
    views = Views(explorer)
    texts = prompts(explorer, repeats + 1)
    views.refresh(texts[-1], 0, 0, 1.0, 0, 1.0, 8, 0)  # warm-up
    refresh, cpu, forward = [], [], []
    for text in texts[:repeats]:
        ids = torch.tensor([explorer.encode(text).ids])
        start = time.perf_counter()
        with torch.no_grad():
            explorer.model(input_ids=ids, output_attentions=True, use_cache=False)
        forward.append(time.perf_counter() - start)
        start, start_cpu = time.perf_counter(), time.process_time()
        views.refresh(text, explorer.config.num_hidden_layers - 1, 0, 0.8, 40, 0.95, 8, 0)
        refresh.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(refresh), statistics.median(cpu), statistics.median(forward)


VIEWS = ["gx-tokens", "gx-next", "gx-heatmap", "gx-heads", "gx-lens", "gx-step"]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_round_trip(explorer: Explorer, repeats: int, screenshot: str | None) -> float:
    """Median seconds, timed inside Chromium, from clicking Run with a fresh prompt until all six views show it."""
    import socket

    from playwright.sync_api import sync_playwright

    from gpt2_scratch.explore import DEFAULT_PROMPT, build_app, launch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(explorer)
    url = launch(app, "127.0.0.1", port)
    # Timed in the page: Gradio marks each view "pending" from the click until its new HTML is in; a MutationObserver
    # notes when none is pending any more and all six differ from before. (Polling from Playwright instead would
    # re-serialise the 300 KB heatmap every frame and time itself.)
    watch = """([views, before]) => { const start = performance.now(); window.gxDone = null;
      const pending = views.map(view => `#${view} .pending`).join(", ");
      new MutationObserver((_, observer) => {
        const same = (view, i) => document.getElementById(view).innerHTML === before[i];
        if (document.querySelector(pending) || views.some(same)) return;
        window.gxDone = performance.now() - start;
        observer.disconnect();
      }).observe(document.body, {subtree: true, childList: true, attributes: true});
      document.getElementById("gx-run").click(); }"""
    seconds = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#gx-step .gx-step")
        for text in prompts(explorer, repeats + 1)[1:]:
            before = [page.inner_html(f"#{view}") for view in VIEWS]
            page.fill("#gx-prompt textarea", text)
            page.evaluate(watch, [VIEWS, before])
            page.wait_for_function("window.gxDone !== null", timeout=120_000)
            seconds.append(page.evaluate("window.gxDone") / 1000)
        if screenshot:
            page.fill("#gx-prompt textarea", DEFAULT_PROMPT)
            page.click("#gx-run")
            page.wait_for_selector("#gx-tokens .gx-token >> nth=9")
            box = page.locator("#gx-layer input[type=number]")
            box.fill("2")
            box.press("Enter")
            page.wait_for_selector("#gx-heatmap svg[data-layer='2']")
            page.screenshot(path=screenshot, full_page=True)
        browser.close()
    app.close()
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="the demo model folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--screenshot", metavar="PNG", help="save the demo model's page here")
    args = parser.parse_args()
    if not (Path(args.demo) / "config.json").is_file():
        print(f"{args.demo}: no model there; run `make demo` first (or --demo DIR)", file=sys.stderr)
        return 2
    quiet_library_progress()
    transformers.logging.set_verbosity_error()  # cutting prompts from a long text warns about its length
    torch.manual_seed(0)
    small = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", qkv_bias=True))
    cases = [("demo model", load_explorer(args.demo), 0.5),
             ("gpt2-small (random init)", Explorer(small, load_gpt2_tokenizer(), "gpt2-small"), 2.0)]
    print(f"torch threads {torch.get_num_threads()}; median of {args.repeats} fresh {TOKENS}-token prompts")
    print(f"load average before: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")
    print(f"{'model':26s} {'params':>12s} {'refresh (s)':>12s} {'CPU (s)':>8s} {'forward (s)':>12s} "
          f"{'refresh/fwd':>12s} {'target (s)':>11s}")
    for name, explorer, target in cases:
        refresh, cpu, forward = measure(explorer, args.repeats)
        print(f"{name:26s} {explorer.model.num_parameters():12,d} {refresh:12.3f} {cpu:8.3f} {forward:12.3f} "
              f"{refresh / forward:12.1f} {target:11.1f}  {'ok' if refresh <= target else 'MISSED'}")
    seconds = browser_round_trip(cases[0][1], args.repeats, args.screenshot)
    print(f"demo model in Chromium: Run -> all six views updated, median {seconds:.3f} s")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
