"""gpt2-scratch: a GPT-2 written from scratch that behaves like any Hugging Face model.

Importing the package registers the model with transformers' Auto classes, so `AutoModelForCausalLM` and friends
resolve `model_type="gpt2_scratch"` without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_gpt2_scratch import PRESETS, GPT2ScratchConfig
from .modeling_gpt2_scratch import (
    GPT2ScratchForCausalLM,
    GPT2ScratchForSequenceClassification,
    GPT2ScratchModel,
    GPT2ScratchPreTrainedModel,
)

AutoConfig.register(GPT2ScratchConfig.model_type, GPT2ScratchConfig, exist_ok=True)
AutoModel.register(GPT2ScratchConfig, GPT2ScratchModel, exist_ok=True)
AutoModelForCausalLM.register(GPT2ScratchConfig, GPT2ScratchForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(GPT2ScratchConfig, GPT2ScratchForSequenceClassification, exist_ok=True)

__all__ = [
    "PRESETS",
    "GPT2ScratchConfig",
    "GPT2ScratchForCausalLM",
    "GPT2ScratchForSequenceClassification",
    "GPT2ScratchModel",
    "GPT2ScratchPreTrainedModel",
]
