"""Where a model comes from: a gpt2_scratch folder, a stock GPT-2 folder, or a Hub id such as `openai-community/gpt2`.

The training scripts and the CLI load models and tokenizers only through these functions, so every one of them
accepts the same sources and refuses the same mistakes with the same one-line messages. The conversion of a stock
GPT-2 itself lives beside the model, in stock_gpt2_scratch.py (`from_pretrained`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any, TypeVar

import datasets
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging

from .configuration_gpt2_scratch import GPT2ScratchConfig
from .data import looks_like_hub_id
from .modeling_gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchPreTrainedModel

STOCK = "gpt2"  # the model_type of transformers' GPT-2, which OpenAI's checkpoints on the Hub carry
LOADABLE = (GPT2ScratchConfig.model_type, STOCK)
Model = TypeVar("Model", bound=GPT2ScratchPreTrainedModel)


def quiet_library_progress(stream: IO[str] | None = None) -> None:
    """For the package's own commands: no transformers progress bars (loading or writing one of our models takes a
    moment, and each drew a bar), and no datasets bars where the output is not a terminal (every redraw of a bar is
    another stretch of a log file)."""
    logging.disable_progress_bar()
    if not (stream or sys.stderr).isatty():
        datasets.disable_progress_bars()


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def source_config(name: str, where: str) -> dict[str, Any]:
    """The config.json of a local model folder or of a Hub model (downloaded, or read from the Hugging Face cache
    when offline), as a dict; a clear error when there is none."""
    path = Path(name)
    if path.exists() or not looks_like_hub_id(name):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{where} {name}: not a model folder (no config.json); give a folder saved by "
                                    "gpt2-scratch, a stock GPT-2 folder, or a Hub id such as openai-community/gpt2")
    try:
        config, _ = PreTrainedConfig.get_config_dict(name)
    except OSError as error:
        raise FileNotFoundError(f"{where} {name}: not a local folder, and no Hub model of that id could be read "
                                f"({first_line(error)})") from error
    return config


def check_source(name: str, where: str) -> dict[str, Any]:
    """The source's config, if it is a model we load (gpt2_scratch, or stock GPT-2 which is converted on load)."""
    config = source_config(name, where)
    if config.get("model_type") not in LOADABLE:
        raise ValueError(f"{where} {name}: model_type is {config.get('model_type')!r}; give a gpt2_scratch model or "
                         "a stock GPT-2 (model_type 'gpt2', e.g. openai-community/gpt2)")
    return config


def load_model(cls: type[Model], name: str, where: str, **kwargs: Any) -> Model:
    """`cls.from_pretrained(name, **kwargs)` after checking the source: a stock GPT-2 is converted on load."""
    check_source(name, where)
    return cls.from_pretrained(name, **kwargs)


def load_tokenizer(name: str, where: str, remedy: str = "give one with --tokenizer") -> PreTrainedTokenizerBase:
    """The tokenizer of a folder or Hub model (for OpenAI's GPT-2: its byte-level BPE, 50,257 tokens)."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{where} {name}: no usable tokenizer there ({first_line(error)}); {remedy}") from error


def load_for_generation(source: str) -> tuple[GPT2ScratchForCausalLM, PreTrainedTokenizerBase]:
    """Model and tokenizer from a folder or a Hub id: a gpt2_scratch model, or a stock GPT-2 converted on load."""
    where = "--model"
    check_source(source, where)
    tokenizer = load_tokenizer(source, where, remedy="save one into the model folder")
    return load_model(GPT2ScratchForCausalLM, source, where).eval(), tokenizer


def load_adapter(model: GPT2ScratchForCausalLM, adapter: str) -> PeftModel:
    """`model` with the LoRA adapter in folder `adapter` (a PeftModel, in eval mode)."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {adapter}: not a PEFT adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter).eval()
