"""`gpt2-scratch explore`: a local page that shows what a checkpoint computes for a prompt.

The numbers come from plain functions of the model (testable without a browser): `tokens`, `next_token` (the
distribution after transformers' own logits warpers), `attention`, `logit_lens`, `step_by_step` (decoding with the
KV cache) and `training_record` (what a training run left in its folder). `render_*` turn them into HTML, and
`build_app` lays them out as a Gradio page, which runs locally (`gpt2-scratch explore`) or as a Hugging Face Space
(space/app.py). The page takes only a prompt and numbers: it cannot make the server open any other file.
"""

from __future__ import annotations

import base64
import copy
import functools
import html
import io
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Cache, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .loading import first_line, load_adapter, load_for_generation
from .tokenizer import token_pieces

DEFAULT_PROMPT = "To be, or not to be, that is the question:"
SHOWN_CANDIDATES = 10
HEATMAP_TOKENS = 96  # a larger (queries x keys) map is drawn for its last 96 tokens


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]  # what the views run on: the last `context` tokens of the prompt
    dropped: int  # tokens cut from the front of the prompt to fit the context


@dataclass(frozen=True)
class Token:
    id: int
    token: str  # the vocabulary entry (byte-level: Ġ is a space)
    text: str  # what it stands for, with spaces, newlines and partial characters made visible


@dataclass(frozen=True)
class Candidate:
    id: int
    text: str
    probability: float  # softmax of the model's logits
    kept: bool  # survives temperature, top-k and top-p
    sampled_probability: float  # softmax after the warpers (renormalised over the kept tokens; 0 when removed)


@dataclass(frozen=True)
class LensRow:
    layer: str  # "embeddings", "block 1", ...
    id: int
    text: str
    probability: float


@dataclass(frozen=True)
class Step:
    id: int
    text: str
    probability: float  # the model's, before the warpers
    sampled_probability: float  # of the distribution it was drawn from
    cache_length: int  # positions in the KV cache when it was chosen (the keys its query attended over)


@dataclass(frozen=True)
class Forward:
    logits: torch.Tensor  # (vocab,) at the last position
    attentions: torch.Tensor  # (layers, heads, queries, keys)
    hidden_states: tuple[torch.Tensor, ...]  # (tokens, emb_dim) each: the embeddings, each block's input, the output
    cache: Cache  # the prompt's keys and values: step by step starts from a copy


def visible(piece: str | bytes) -> str:
    """A token's text with spaces (·), newlines (↵) and tabs (→) made visible, and the bytes of a partial character
    or of a control character written <0xNN>."""
    if isinstance(piece, bytes):
        return "".join(f"<0x{byte:02X}>" for byte in piece)
    piece = piece.replace(" ", "·").replace("\n", "↵").replace("\t", "→")
    return "".join(c if c.isprintable() else "".join(f"<0x{b:02X}>" for b in c.encode()) for c in piece)


def warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """transformers' own temperature, top-k and top-p warpers, in generate()'s order; top_k 0 and top_p 1 are off."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top-p must be in (0, 1], got {top_p}")
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        processors.append(TopKLogitsWarper(int(top_k)))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


class Explorer:
    """A model and its tokenizer, with the computations every view of the page shows."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str,
                 folder: Path | None = None) -> None:
        model.set_attn_implementation("eager")  # the fused kernel never forms the attention weights
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.config = model.config
        self.context: int = model.config.max_position_embeddings
        self.folder = folder
        self.lock = threading.Lock()  # one forward at a time: the page's events run in threads
        self.forward = functools.lru_cache(maxsize=2)(self._forward)  # gpt2-small's attentions at 1024 tokens: 600 MB

    def encode(self, prompt: str) -> Encoded:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        kept = ids[-self.context:] if ids else []
        return Encoded(tuple(kept), len(ids) - len(kept))

    def tokens(self, ids: tuple[int, ...]) -> list[Token]:
        pieces = token_pieces(self.tokenizer, list(ids))
        return [Token(i, token, visible(piece))
                for i, token, piece in zip(ids, self.tokenizer.convert_ids_to_tokens(list(ids)), pieces)]

    def text(self, token_id: int) -> str:
        return visible(token_pieces(self.tokenizer, [token_id])[0])

    def _forward(self, ids: tuple[int, ...]) -> Forward:
        with self.lock, torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), output_attentions=True, output_hidden_states=True,
                             use_cache=True, logits_to_keep=1)  # the head on the last position only
        return Forward(out.logits[0, -1].float(), torch.stack([a[0] for a in out.attentions]).float(),
                       tuple(h[0] for h in out.hidden_states), out.cache)

    def next_token(self, ids: tuple[int, ...], temperature: float, top_k: int, top_p: float,
                   shown: int = SHOWN_CANDIDATES) -> list[Candidate]:
        """The `shown` most likely next tokens: the model's probability, and the renormalised probability after the
        warpers (the distribution `generate(do_sample=True)` draws from)."""
        logits = self.forward(ids).logits
        probabilities = torch.softmax(logits, -1)
        sampled = self.sampling_distribution(ids, logits, temperature, top_k, top_p)
        top = torch.topk(probabilities, min(shown, probabilities.numel()))
        return [Candidate(i, self.text(i), float(probabilities[i]), bool(sampled[i] > 0), float(sampled[i]))
                for i in top.indices.tolist()]

    @staticmethod
    def sampling_distribution(ids: tuple[int, ...] | torch.Tensor, logits: torch.Tensor, temperature: float,
                              top_k: int, top_p: float) -> torch.Tensor:
        input_ids = ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])
        return torch.softmax(warpers(temperature, top_k, top_p)(input_ids, logits[None].clone())[0], -1)

    def sample(self, ids: tuple[int, ...], temperature: float, top_k: int, top_p: float, seed: int) -> int:
        """One draw from the warped distribution, as `set_seed(seed)` then `generate(do_sample=True)` draws it."""
        sampled = self.sampling_distribution(ids, self.forward(ids).logits, temperature, top_k, top_p)
        return int(torch.multinomial(sampled, 1, generator=torch.Generator().manual_seed(int(seed))))

    def attention(self, ids: tuple[int, ...], layer: int) -> torch.Tensor:
        """(heads, queries, keys) attention weights of one layer, as `output_attentions` gives them."""
        return self.forward(ids).attentions[layer]

    def logit_lens(self, ids: tuple[int, ...]) -> list[LensRow]:
        """At the last position, each layer's top guess: its residual stream through the final LayerNorm and the
        (tied) output head. The model's last hidden state has been through the final LayerNorm already."""
        states = self.forward(ids).hidden_states
        final_norm, head = self.model.get_decoder().final_norm, self.model.get_output_embeddings()
        rows = []
        with torch.no_grad():
            for index, state in enumerate(states):
                last = state[-1]
                if index < len(states) - 1:
                    last = final_norm(last)
                probabilities = torch.softmax(head(last).float(), -1)
                best = int(probabilities.argmax())
                layer = "embeddings" if index == 0 else f"block {index}"
                rows.append(LensRow(layer, best, self.text(best), float(probabilities[best])))
        return rows

    def step_by_step(self, ids: tuple[int, ...], steps: int, temperature: float, top_k: int, top_p: float,
                     seed: int) -> list[Step]:
        """Generate up to `steps` tokens one at a time through the KV cache: the prompt's forward (shared with the
        other views) fills it, then one token per forward. Draws as `set_seed(seed)` then
        `generate(do_sample=True, ...)` does (top_k 1 is greedy)."""
        steps = max(0, min(steps, self.context - len(ids)))
        generator = torch.Generator().manual_seed(int(seed))
        prompt = self.forward(ids)
        sequence, logits, cache, out = torch.tensor([ids]), prompt.logits, copy.deepcopy(prompt.cache), []
        with self.lock, torch.no_grad():
            for step in range(steps):
                if step:
                    result = self.model(input_ids=sequence[:, -1:], cache=cache, use_cache=True)
                    cache, logits = result.cache, result.logits[0, -1].float()
                sampled = self.sampling_distribution(sequence, logits, temperature, top_k, top_p)
                chosen = int(torch.multinomial(sampled, 1, generator=generator))
                out.append(Step(chosen, self.text(chosen), float(torch.softmax(logits, -1)[chosen]),
                                float(sampled[chosen]), int(cache.get_seq_length())))
                sequence = torch.cat([sequence, torch.tensor([[chosen]])], 1)
        return out


def load_explorer(source: str, adapter: str | None = None) -> Explorer:
    """An Explorer on a model folder or Hub id, with a LoRA adapter merged in; whatever stops the model from loading
    is one line (ValueError or FileNotFoundError), so nothing is served."""
    try:
        model, tokenizer = load_for_generation(source)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as error:  # a damaged weights file, a missing tensor, ...: whatever the loader raised
        raise ValueError(f"--model {source}: the model cannot be loaded ({type(error).__name__}: "
                         f"{first_line(error)}); check the folder's files or give another model") from error
    name = source
    if adapter:
        model = load_adapter(model, adapter).merge_and_unload()
        name = f"{source} + adapter {adapter}"
    folder = Path(source) if Path(source).is_dir() else None
    return Explorer(model, tokenizer, name, folder)


# --- the training run: what pretraining left in its folder (metrics.json, the TensorBoard log under runs/) ---


def training_record(folder: Path | None) -> tuple[dict[str, list[tuple[int, float]]], dict[str, Any]]:
    """The scalars of every TensorBoard log under `folder`/runs (tag -> [(step, value)], a resumed run's later
    values replacing the earlier ones at the same step) and metrics.json; empty when the folder has neither."""
    curves: dict[str, dict[int, float]] = {}
    metrics: dict[str, Any] = {}
    if folder is None:
        return {}, metrics
    if (folder / "metrics.json").is_file():
        metrics = json.loads((folder / "metrics.json").read_text())
    logs = sorted({path.parent for path in (folder / "runs").rglob("events.out.tfevents.*")})
    if logs:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for log in logs:
            events = EventAccumulator(str(log), size_guidance={"scalars": 0})
            events.Reload()
            for tag in events.Tags()["scalars"]:
                for event in sorted(events.Scalars(tag), key=lambda e: e.wall_time):
                    curves.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in curves.items()}, metrics


# --- HTML: every view is a fragment with data- attributes, so a browser test reads the same numbers people see ---


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def message(text: str) -> str:
    return f'<p class="gx-message">{escape(text)}</p>'


def render_tokens(tokens: list[Token], dropped: int, context: int) -> str:
    notice = (f'<p class="gx-notice" id="gx-truncated">The prompt is {len(tokens) + dropped} tokens; the model\'s '
              f"context is {context}, so the views keep the last {context} tokens.</p>") if dropped else ""
    chips = "".join(
        f'<span class="gx-token" data-id="{t.id}" title="#{n} id {t.id} vocabulary entry {escape(repr(t.token))}">'
        f'<span class="gx-text">{escape(t.text)}</span><span class="gx-id">{t.id}</span></span>'
        for n, t in enumerate(tokens))
    return f'{notice}<div class="gx-tokens" data-count="{len(tokens)}">{chips}</div>' \
           f'<p class="gx-small">{len(tokens)} tokens</p>'


def bar(fraction: float, kind: str) -> str:
    return f'<span class="gx-bar {kind}" style="width:{100 * fraction:.2f}%"></span>'


def render_next_token(candidates: list[Candidate], temperature: float, top_k: int, top_p: float) -> str:
    rows = "".join(
        f'<tr class="gx-candidate{"" if c.kept else " gx-removed"}" data-id="{c.id}" data-p="{c.probability:.6f}" '
        f'data-q="{c.sampled_probability:.6f}"><td class="gx-text">{escape(c.text)}</td><td>{c.id}</td>'
        f'<td class="gx-cell">{bar(c.probability, "gx-model")}<span>{c.probability:.4f}</span></td>'
        f'<td class="gx-cell">{bar(c.sampled_probability, "gx-sampled")}'
        f'<span>{f"{c.sampled_probability:.4f}" if c.kept else "removed"}</span></td></tr>'
        for c in candidates)
    settings = f"temperature {temperature:g}, top-k {top_k or 'off'}, top-p {top_p:g}"
    return (f'<table class="gx-table gx-next"><thead><tr><th>next token</th><th>id</th><th>model</th>'
            f"<th>after {escape(settings)}</th></tr></thead><tbody>{rows}</tbody></table>")


BLUE = (8, 48, 107)
PALETTE = ["#" + "".join(f"{round(255 + (c - 255) * level / 255):02x}" for c in BLUE) for level in range(256)]


def colour(weight: float) -> str:
    """White at 0 to deep blue at 1, in 256 steps."""
    return PALETTE[round(255 * min(max(weight, 0.0), 1.0))]


def render_heatmap(weights: torch.Tensor, labels: list[str], layer: int, head: int) -> str:
    """(queries x keys) weights as an SVG: rows are queries, columns keys; hovering a cell shows its value."""
    n = weights.shape[0]
    cell, margin = 14, 8 + 7 * min(max((len(label) for label in labels), default=1), 14)
    size = margin + n * cell
    parts = [f'<svg class="gx-heatmap" data-layer="{layer}" data-head="{head}" viewBox="0 0 {size} {size}" '
             f'width="{min(size, 760)}" xmlns="http://www.w3.org/2000/svg" font-size="11" font-family="monospace">',
             f'<rect x="{margin}" y="{margin}" width="{n * cell}" height="{n * cell}" fill="#eeeeee"/>']
    short = [escape(label[:14]) for label in labels]
    for i, label in enumerate(short):
        middle = margin + i * cell + cell / 2 + 4
        parts.append(f'<text x="{margin - 4}" y="{middle}" text-anchor="end">{label}</text>')
        parts.append(f'<text transform="translate({middle - 1},{margin - 4}) rotate(-90)">{label}</text>')
    values = weights.tolist()
    for q in range(n):
        for k in range(q + 1):  # causal: a query sees itself and the keys before it
            w = values[q][k]
            parts.append(f'<rect x="{margin + k * cell}" y="{margin + q * cell}" width="{cell}" height="{cell}" '
                         f'fill="{colour(w)}" data-q="{q}" data-k="{k}" data-w="{w:.6f}"><title>query {q} '
                         f'{short[q]} → key {k} {short[k]}: {w:.6f}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def png_heatmap(weights: torch.Tensor, pixels: int = 120) -> str:
    """A small (queries x keys) map as a data: URL PNG, for the overview of all heads."""
    from PIL import Image

    n = weights.shape[0]
    levels = weights.clamp(0, 1)
    rgb = torch.stack([255 + (c - 255) * levels for c in BLUE], -1).round().to(torch.uint8)
    image = Image.fromarray(rgb.numpy(), "RGB").resize((max(pixels, n), max(pixels, n)), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def render_heads(weights: torch.Tensor, layer: int) -> str:
    """All heads of a layer as small multiples."""
    figures = "".join(f'<figure class="gx-head" data-head="{h}"><img alt="layer {layer} head {h}" '
                      f'src="{png_heatmap(w)}"/><figcaption>head {h}</figcaption></figure>'
                      for h, w in enumerate(weights))
    return f'<div class="gx-heads" data-layer="{layer}">{figures}</div>'


def render_lens(rows: list[LensRow]) -> str:
    body = "".join(f'<tr class="gx-lens-row" data-id="{r.id}" data-p="{r.probability:.6f}"><td>{escape(r.layer)}'
                   f'</td><td class="gx-text">{escape(r.text)}</td><td>{r.id}</td><td class="gx-cell">'
                   f'{bar(r.probability, "gx-model")}<span>{r.probability:.4f}</span></td></tr>' for r in rows)
    return ('<table class="gx-table gx-lens"><thead><tr><th>after</th><th>top guess</th><th>id</th>'
            f"<th>probability</th></tr></thead><tbody>{body}</tbody></table>"
            '<p class="gx-small">The last row is the model\'s own prediction.</p>')


def render_steps(steps: list[Step], asked: int) -> str:
    if not steps:
        return message("The prompt fills the model's context: there is no room for new tokens.")
    body = "".join(f'<tr class="gx-step" data-id="{s.id}" data-p="{s.probability:.6f}" data-cache="{s.cache_length}">'
                   f'<td>{n + 1}</td><td class="gx-text">{escape(s.text)}</td><td>{s.id}</td>'
                   f"<td>{s.probability:.4f}</td><td>{s.sampled_probability:.4f}</td><td>{s.cache_length}</td></tr>"
                   for n, s in enumerate(steps))
    cut = "" if len(steps) == asked else \
        message(f"Only {len(steps)} of {asked} tokens fit in the model's context.")
    return (f'{cut}<table class="gx-table gx-steps"><thead><tr><th>step</th><th>token</th><th>id</th>'
            "<th>p (model)</th><th>p (drawn from)</th><th>KV cache length</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


def svg_curves(curves: dict[str, list[tuple[int, float]]], width: int = 640, height: int = 260) -> str:
    """Loss curves (train and validation) on shared axes: step across, loss up."""
    series = [(tag, points) for tag, points in curves.items() if points]
    steps = [s for _, points in series for s, _ in points]
    values = [v for _, points in series for _, v in points]
    low, high = min(values), max(values)
    first, last = min(steps), max(steps)
    pad = 44

    def xy(step: int, value: float) -> str:
        x = pad + (width - 2 * pad) * ((step - first) / (last - first) if last > first else 0.5)
        y = height - pad + (2 * pad - height) * ((value - low) / (high - low) if high > low else 0.5)
        return f"{x:.1f},{y:.1f}"

    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    parts = [f'<svg class="gx-curve" viewBox="0 0 {width} {height}" width="{width}" '
             'xmlns="http://www.w3.org/2000/svg" font-size="11" font-family="sans-serif">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>',
             f'<text x="{pad - 4}" y="{pad}" text-anchor="end">{high:.3g}</text>',
             f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">{low:.3g}</text>',
             f'<text x="{pad}" y="{height - pad + 14}">{first}</text>',
             f'<text x="{width - pad}" y="{height - pad + 14}" text-anchor="end">step {last}</text>']
    for n, (tag, points) in enumerate(series):
        stroke = palette[n % len(palette)]
        coords = " ".join(xy(s, v) for s, v in points)
        parts.append(f'<polyline data-tag="{escape(tag)}" fill="none" stroke="{stroke}" stroke-width="1.5" '
                     f'points="{coords}"/>')
        parts.extend(f'<circle cx="{xy(s, v).split(",")[0]}" cy="{xy(s, v).split(",")[1]}" r="2.5" fill="{stroke}">'
                     f"<title>{escape(tag)} step {s}: {v:.4f}</title></circle>" for s, v in points)
        parts.append(f'<text x="{width - pad}" y="{pad + 14 * n}" text-anchor="end" fill="{stroke}">'
                     f"{escape(tag)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def render_run(curves: dict[str, list[tuple[int, float]]], metrics: dict[str, Any]) -> str:
    if not curves and not metrics:
        return message("No training record here: this view reads the metrics.json and the TensorBoard log (runs/) "
                       "that training/pretrain.py writes into its output folder.")
    losses = {tag: points for tag, points in curves.items() if tag.endswith("/loss")}
    curve = svg_curves(losses) if losses else ""
    rows = "".join(f'<tr data-metric="{escape(k)}"><td>{escape(k)}</td><td>'
                   f'{f"{v:.4f}" if isinstance(v, float) else escape(v)}</td></tr>' for k, v in metrics.items())
    table = f'<table class="gx-table gx-metrics"><tbody>{rows}</tbody></table>' if rows else ""
    return f"{curve}{table}"


CSS = """
.gx-tokens { display: flex; flex-wrap: wrap; gap: 4px; }
.gx-token { display: inline-flex; flex-direction: column; align-items: center; padding: 2px 5px; border-radius: 4px;
  font-family: monospace; }
.gx-token:nth-child(5n+1) { background: #cfe3f6; } .gx-token:nth-child(5n+2) { background: #f9dfc0; }
.gx-token:nth-child(5n+3) { background: #cdebd2; } .gx-token:nth-child(5n+4) { background: #f6cfd2; }
.gx-token:nth-child(5n+5) { background: #ddd3ee; }
.gx-token .gx-id { font-size: 10px; color: #555; }
.gx-table { border-collapse: collapse; font-size: 13px; width: 100%; }
.gx-table td, .gx-table th { padding: 2px 6px; text-align: left; color: #111; }
.gx-text { font-family: monospace; white-space: pre; }
.gx-cell { position: relative; min-width: 140px; }
.gx-cell span:last-child { position: relative; }
.gx-bar { position: absolute; left: 0; top: 3px; bottom: 3px; border-radius: 2px; }
.gx-model { background: #9ecae1; } .gx-sampled { background: #fdae6b; }
.gx-removed { color: #aaa; text-decoration: line-through; }
.gx-heads { display: flex; flex-wrap: wrap; gap: 6px; }
.gx-head { margin: 0; text-align: center; font-size: 11px; }
.gx-head img { width: 90px; height: 90px; image-rendering: pixelated; border: 1px solid #ccc; }
.gx-message, .gx-notice { font-weight: 600; color: #a33; }
.gx-small { font-size: 11px; color: #666; }
"""


def describe(explorer: Explorer) -> str:
    c = explorer.config
    return (f"**{explorer.name}**: {c.num_hidden_layers} layers, {c.num_attention_heads} heads, context "
            f"{explorer.context} tokens, vocabulary {c.vocab_size:,}, "
            f"{explorer.model.num_parameters():,} parameters")


class Views:
    """The page's event handlers: prompt and controls in, HTML out. Every view says what is wrong with an empty
    prompt instead of failing."""

    EMPTY = message("Type a prompt: the views show what the model computes for its tokens.")

    def __init__(self, explorer: Explorer) -> None:
        self.explorer = explorer

    def tokens(self, prompt: str) -> str:
        encoded = self.explorer.encode(prompt)
        if not encoded.ids:
            return self.EMPTY
        return render_tokens(self.explorer.tokens(encoded.ids), encoded.dropped, self.explorer.context)

    def next_token(self, prompt: str, temperature: float, top_k: float, top_p: float) -> str:
        ids = self.explorer.encode(prompt).ids
        if not ids:
            return self.EMPTY
        candidates = self.explorer.next_token(ids, temperature, int(top_k), top_p)
        return render_next_token(candidates, temperature, int(top_k), top_p)

    def sample(self, prompt: str, temperature: float, top_k: float, top_p: float, seed: float) -> str:
        ids = self.explorer.encode(prompt).ids
        if not ids:
            return self.EMPTY
        seed = int(seed or 0)  # an emptied seed box is 0
        drawn = self.explorer.sample(ids, temperature, int(top_k), top_p, seed)
        return (f'<p class="gx-sample" data-id="{drawn}">seed {seed} drew '
                f'<span class="gx-text">{escape(self.explorer.text(drawn))}</span> (id {drawn})</p>')

    def attention(self, prompt: str, layer: float, head: float) -> tuple[str, str]:
        ids = self.explorer.encode(prompt).ids
        if not ids:
            return self.EMPTY, ""
        weights = self.explorer.attention(ids, int(layer))[:, -HEATMAP_TOKENS:, -HEATMAP_TOKENS:]
        labels = [t.text for t in self.explorer.tokens(ids[-HEATMAP_TOKENS:])]
        note = message(f"The map shows the last {HEATMAP_TOKENS} of the {len(ids)} tokens (queries and keys).") \
            if len(ids) > HEATMAP_TOKENS else ""
        return (note + render_heatmap(weights[int(head)], labels, int(layer), int(head)),
                render_heads(weights, int(layer)))

    def lens(self, prompt: str) -> str:
        ids = self.explorer.encode(prompt).ids
        return render_lens(self.explorer.logit_lens(ids)) if ids else self.EMPTY

    def steps(self, prompt: str, steps: float, temperature: float, top_k: float, top_p: float, seed: float) -> str:
        ids = self.explorer.encode(prompt).ids
        if not ids:
            return self.EMPTY
        return render_steps(self.explorer.step_by_step(ids, int(steps), temperature, int(top_k), top_p, int(seed or 0)),
                            int(steps))

    def refresh(self, prompt: str, layer: float, head: float, temperature: float, top_k: float, top_p: float,
                steps: float, seed: float) -> tuple[str, ...]:
        """Every view of the prompt, in the page's order."""
        return (self.tokens(prompt), self.next_token(prompt, temperature, top_k, top_p),
                *self.attention(prompt, layer, head), self.lens(prompt),
                self.steps(prompt, steps, temperature, top_k, top_p, seed))


def build_app(explorer: Explorer):
    """The Gradio page (a `gr.Blocks`); launch it, or let a Space run it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry; read by gradio at import
    import gradio as gr

    views = Views(explorer)
    c = explorer.config
    with gr.Blocks(title=f"gpt2-scratch explorer: {explorer.name}", analytics_enabled=False) as app:
        gr.Markdown(f"## gpt2-scratch explorer\n{describe(explorer)}", elem_id="gx-model")
        with gr.Row():
            prompt = gr.Textbox(DEFAULT_PROMPT, label="prompt", lines=2, scale=5, elem_id="gx-prompt")
            run = gr.Button("Run", variant="primary", scale=1, elem_id="gx-run")
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("### Tokens")
                tokens = gr.HTML(elem_id="gx-tokens")
                gr.Markdown("### Next token")
                with gr.Row():
                    temperature = gr.Slider(0.05, 3.0, value=1.0, step=0.05, label="temperature",
                                            elem_id="gx-temperature")
                    top_k = gr.Slider(0, 100, value=0, step=1, label="top-k (0 = off)", elem_id="gx-top-k")
                    top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="top-p", elem_id="gx-top-p")
                candidates = gr.HTML(elem_id="gx-next")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="gx-seed")
                    sample = gr.Button("Sample", elem_id="gx-sample-button")
                drawn = gr.HTML(elem_id="gx-sample")
            with gr.Column(scale=1):
                gr.Markdown("### Attention")
                with gr.Row():
                    layer = gr.Slider(0, c.num_hidden_layers - 1, value=0, step=1, label="layer", elem_id="gx-layer")
                    head = gr.Slider(0, c.num_attention_heads - 1, value=0, step=1, label="head", elem_id="gx-head")
                heatmap = gr.HTML(elem_id="gx-heatmap")
                heads = gr.HTML(elem_id="gx-heads")
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("### Logit lens (last position)")
                lens = gr.HTML(elem_id="gx-lens")
            with gr.Column(scale=1):
                gr.Markdown("### Step by step (temperature, top-k, top-p and seed as above)")
                steps = gr.Slider(1, 32, value=8, step=1, label="new tokens", elem_id="gx-steps")
                stepped = gr.HTML(elem_id="gx-step")
        gr.Markdown("### The run")
        gr.HTML(render_run(*training_record(explorer.folder)), elem_id="gx-run-record")

        everything = [tokens, candidates, heatmap, heads, lens, stepped]
        controls = [prompt, layer, head, temperature, top_k, top_p, steps, seed]
        for event in (run.click, prompt.submit, app.load):
            event(views.refresh, controls, everything)
        for slider in (layer, head):
            slider.change(views.attention, [prompt, layer, head], [heatmap, heads])
        sampling = [prompt, temperature, top_k, top_p]
        for slider in (temperature, top_k, top_p):
            slider.change(views.next_token, sampling, candidates)
        sample.click(views.sample, [*sampling, seed], drawn)
        steps.change(views.steps, [prompt, steps, temperature, top_k, top_p, seed], stepped)
    return app


LAUNCH = dict(share=False, footer_links=[], css=CSS)  # no share link, no API page; the page's own styles


def launch(app, host: str, port: int) -> str:
    """Serve `app` on host:port without blocking; returns the URL."""
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH)
    return app.local_url
