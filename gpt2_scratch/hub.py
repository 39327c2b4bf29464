"""Hub-ready output: a model card rendered from `model_cards/`, a loss curve, and `push_to_hub`."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import filter_repo_objects

TEMPLATES = Path(__file__).resolve().parent.parent / "model_cards"
NOT_UPLOADED = ["checkpoint-*", ".checkpoint-*", "*.partial*", ".*"]


def render_model_card(
    template: str,
    *,
    repo_id: str,
    dataset: str,
    metrics: dict[str, float],
    pipeline_tag: str,
    license: str,
    training_config: dict,
    split: str = "validation",
    **fields: object,
) -> ModelCard:
    """Card with YAML metadata (library, pipeline, tags, dataset, licence, metrics measured on `split`) and the
    template's text."""
    local = Path(dataset).exists()
    hub_dataset = dataset if "/" in dataset and not local else None  # only Hub ids belong in `datasets` metadata
    dataset = Path(dataset).name if local else dataset
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        tags=["gpt2-scratch", "gpt2", "custom_code"],
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=repo_id,
        eval_results=[
            EvalResult(task_type=pipeline_tag, dataset_type=hub_dataset or dataset, dataset_name=dataset,
                       dataset_split=split, metric_type=name.split("/")[-1], metric_value=round(value, 6))
            for name, value in metrics.items()
        ],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / template),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        dataset=dataset,
        metrics=metrics,
        training_config=json.dumps(training_config, indent=2, sort_keys=True, default=str),
        split=split,
        **fields,
    )


def save_loss_curve(history: list[dict], path: Path) -> None:
    """Training loss (as logged) and every validation pass, each validation point labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]
    evals = [(h["step"], h["eval/loss"]) for h in history if "eval/loss" in h]
    figure, axes = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (evals, "validation", "o-")):
        if points:
            axes.plot(*zip(*points), style, label=label)
    if len(evals) <= 12:  # a few points: their values are readable
        for step, loss in evals:
            axes.annotate(f"{loss:.3f}", (step, loss), textcoords="offset points", xytext=(0, 7), ha="center",
                          fontsize=8, color=axes.lines[-1].get_color())
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_attention_heatmaps(weights, labels: list[str], layers: list[int], heads: list[int], path: Path) -> None:
    """One heatmap per (layer, head) of `weights` (layers, heads, queries, keys): row i is where token i looks. The
    future, hidden by the causal mask, is left blank. Rows are layers and columns heads, both counted from 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(labels)
    shown = [label.replace(" ", "·").replace("\n", "\\n") for label in labels]  # spaces made visible
    future = np.triu(np.ones((n, n), dtype=bool), k=1)
    single = len(layers) == len(heads) == 1
    side = max(4.0, 0.3 * n + 1.5) if single else max(1.8, min(0.12 * n + 0.8, 4.0))
    figure, grid = plt.subplots(len(layers), len(heads), figsize=(side * len(heads) + 1, side * len(layers) + 0.5),
                                squeeze=False)
    font = 9 if single else max(4, 8 - n // 10)
    for row, layer in enumerate(layers):
        for column, head in enumerate(heads):
            axes = grid[row][column]
            image = axes.imshow(np.ma.masked_array(weights[layer, head].float().numpy(), future), cmap="viridis",
                                vmin=0.0)
            axes.set_title(f"layer {layer}, head {head}", fontsize=font + 1)
            show_x, show_y = row == len(layers) - 1 and n <= 48, column == 0 and n <= 48
            axes.set_xticks(range(n) if show_x else [], shown if show_x else [], rotation=90, fontsize=font)
            axes.set_yticks(range(n) if show_y else [], shown if show_y else [], fontsize=font)
    if single:
        grid[0][0].set_xlabel("key: the token looked at")
        grid[0][0].set_ylabel("query: the token looking")
        figure.colorbar(image, ax=grid[0][0], fraction=0.046, pad=0.04, label="attention weight")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """Rows are the true labels, columns the predicted ones, each cell annotated with its count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 2.5 + 0.6 * len(labels)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    largest = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if count > largest / 2 else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def push_folder(folder: Path, repo_id: str) -> str:
    """Create the repo if needed and upload the folder, checkpoints excluded; returns the repo's URL."""
    api = HfApi()
    url = api.create_repo(repo_id, exist_ok=True)
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path))
                  for path in filter_repo_objects(files, ignore_patterns=NOT_UPLOADED)]
    api.create_commit(repo_id, operations=operations, commit_message="Upload gpt2-scratch model")
    return str(url)
