"""The teacher families radlads converts: the one place that knows how each names its modules.

All supported families share the Llama layout (model.embed_tokens, model.layers.{i}.self_attn.
{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input/post_attention_layernorm, model.norm, lm_head);
they differ in which projections carry biases and whether q/k are RMS-normalised per head.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    model_type: str
    prefix: str  # class-name prefix in transformers, e.g. "Qwen2" for Qwen2MLP
    qkv_bias_always: bool = False  # Qwen2 has q/k/v biases regardless of config.attention_bias
    qk_norm: bool = False  # Qwen3 RMS-normalises q and k per head before RoPE

    def _module(self):
        return _modeling_module(self.model_type)

    def cls(self, suffix: str):
        return getattr(self._module(), f"{self.prefix}{suffix}")

    def mlp(self, config: PretrainedConfig):
        return self.cls("MLP")(config)

    def norm(self, config: PretrainedConfig, dim: int | None = None):
        return self.cls("RMSNorm")(dim or config.hidden_size, eps=config.rms_norm_eps)

    def rotary(self, config: PretrainedConfig):
        return self.cls("RotaryEmbedding")(config=config)

    def rope(self):
        """The family's own RoPE function, `(q, k, cos, sin, unsqueeze_dim) -> (q, k)`. Callers keep
        it: looking it up per call would be a module import that torch.compile cannot trace."""
        return self._module().apply_rotary_pos_emb

    def biases(self, config: PretrainedConfig) -> tuple[bool, bool]:
        """(q/k/v projections have bias, o projection has bias)."""
        flag = bool(getattr(config, "attention_bias", False))
        return (self.qkv_bias_always or flag, flag and not self.qkv_bias_always)


@functools.cache
def _modeling_module(model_type: str):
    """The family's transformers modeling module, looked up once (RoPE runs on every forward)."""
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama"),
        Family("mistral", "Mistral"),
        Family("qwen2", "Qwen2", qkv_bias_always=True),
        Family("qwen3", "Qwen3", qk_norm=True),
    )
}


class UnsupportedTeacherError(ValueError):
    pass


def family_of(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedTeacherError(
            f"teacher architecture {model_type!r} is not supported; supported model_type values: "
            f"{', '.join(sorted(FAMILIES))} (SmolLM and other Llama-style models report 'llama')"
        ) from None
