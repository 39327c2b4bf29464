"""Configuration of gpt2-scratch: the handful of numbers that define a GPT-2.

This file is copied next to every saved checkpoint, so it imports nothing from the package.
"""

from __future__ import annotations

from typing import Any

try:  # transformers >= 5 renamed the base class; keep the old name working for older installs.
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - exercised only on transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

# The seed's GPT_CONFIG_124M and OpenAI's released sizes, plus small models a 2-core CPU can train in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": dict(vocab_size=50257, context_length=1024, emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": dict(vocab_size=50257, context_length=1024, emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": dict(vocab_size=50257, context_length=1024, emb_dim=1600, n_heads=25, n_layers=48),
    "cpu-1m": dict(vocab_size=8192, context_length=256, emb_dim=96, n_heads=4, n_layers=4),
    "cpu-10m": dict(vocab_size=8192, context_length=256, emb_dim=320, n_heads=5, n_layers=6),
    "cpu-30m": dict(vocab_size=8192, context_length=256, emb_dim=512, n_heads=8, n_layers=8),
}

# Every class of the modeling file, so a checkpoint saved from any of them loads through every Auto class.
AUTO_MAP = {
    "AutoConfig": "configuration_gpt2_scratch.GPT2ScratchConfig",
    "AutoModel": "modeling_gpt2_scratch.GPT2ScratchModel",
    "AutoModelForCausalLM": "modeling_gpt2_scratch.GPT2ScratchForCausalLM",
    "AutoModelForSequenceClassification": "modeling_gpt2_scratch.GPT2ScratchForSequenceClassification",
}


class GPT2ScratchConfig(PreTrainedConfig):
    """Hyper-parameters of a GPT-2, named as in the seed (`emb_dim`, `n_heads`, ...).

    transformers' generic names (`hidden_size`, `num_attention_heads`, `num_hidden_layers`,
    `max_position_embeddings`) and GPT-2's own (`n_embd`, `n_head`, `n_layer`, `n_positions`) read and write the
    same values through `attribute_map`.
    """

    model_type = "gpt2_scratch"
    attribute_map = {
        "hidden_size": "emb_dim",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "context_length",
        "n_embd": "emb_dim",
        "n_head": "n_heads",
        "n_layer": "n_layers",
        "n_positions": "context_length",
    }
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 50257,
        context_length: int = 1024,
        emb_dim: int = 768,
        n_heads: int = 12,
        n_layers: int = 12,
        drop_rate: float = 0.1,
        qkv_bias: bool = False,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None | str = "last",
        eos_token_id: int | None | str = "last",
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.emb_dim = emb_dim
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.drop_rate = drop_rate
        self.qkv_bias = qkv_bias
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id  # GPT-2 has no padding token; classification and batching may set one
        self._check()
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(
            # GPT-2 keeps its one special token, <|endoftext|>, at the last id; so do our trained tokenizers.
            bos_token_id=vocab_size - 1 if bos_token_id == "last" else bos_token_id,
            eos_token_id=vocab_size - 1 if eos_token_id == "last" else eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2ScratchConfig: {name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"GPT2ScratchConfig: emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}), "
                "because each head gets an equal emb_dim / n_heads slice"
            )
        if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPT2ScratchConfig: drop_rate must be in [0, 1), got {self.drop_rate!r}")
        # NaN fails every comparison, so "not (0 < x < inf)" also refuses it: a NaN here would poison every output.
        for name, low in (("layer_norm_epsilon", 0.0), ("initializer_range", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < float("inf"):
                raise ValueError(f"GPT2ScratchConfig: {name} must be a positive finite number, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2ScratchConfig:
        """A config from a named preset (see `PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
