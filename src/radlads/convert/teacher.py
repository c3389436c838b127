"""The teacher's side of training (steps 1 and 2): how it is compiled and how it is run.

The teacher only runs forward, without gradients. Its cost is GPU work plus host work: the host
launches ~15 kernels a layer, and whatever makes the host wait for the GPU leaves the GPU idle
until the host is ahead again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

TEACHER_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
# Attention implementations that, given no mask, run causal (eager attention attends everywhere).
_CAUSAL_WITHOUT_MASK = ("sdpa", "flash_attention_2", "flash_attention_3")


def prepare_teacher(teacher: nn.Module, compile: bool, whole_layers: bool = False) -> None:
    """Compile (or, with compile=False, un-compile) each teacher layer: in eager mode its
    elementwise work (RMSNorm, RoPE, SiLU gating; ~40 kernels a layer) takes longer than its
    matmuls.

    whole_layers=False (step 1) compiles the attention, MLP and norms one by one, and only each
    module's forward, not its call: step 1's forward hooks (alignment.teacher_attention_io) run
    around the compiled code, not inside it, where Dynamo would recompile for each new hook; the
    residual adds stay eager. whole_layers=True (step 2, no hooks) compiles each decoder layer as
    one graph: the residual adds fuse into the norms, and the host makes one call a layer."""
    for layer in teacher.model.layers:
        parts = [getattr(layer, part) for part in TEACHER_LAYER_PARTS]
        for module in (layer, *parts):
            module.__dict__.pop("forward", None)  # back to the class's forward
        if compile:
            for module in [layer] if whole_layers else parts:
                module.forward = torch.compile(module.forward)


def teacher_hidden_states(
    teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """`teacher.model(input_ids, attention_mask).last_hidden_state`.

    Where the mask transformers would build is plain causal (no padding mask given), the layers
    run without one (SDPA and flash attention then run causal, as transformers has them do for
    such a batch) and the mask is never built: building it checks the position ids for packed
    sequences with a `.all()` read on the host, which stalls the host until the GPU has drained
    its queue (in step 2, the student's whole forward), after which the GPU waits on each launch
    until the host is ahead again."""
    model = teacher.model
    length = input_ids.shape[1]
    if attention_mask is not None or not _causal_without_mask(model.config, length):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = model.embed_tokens(input_ids)
    position_ids = torch.arange(length, device=input_ids.device)[None]
    position_embeddings = model.rotary_emb(hidden, position_ids)
    for layer in model.layers[: model.config.num_hidden_layers]:
        hidden = layer(hidden, position_ids=position_ids, position_embeddings=position_embeddings)
    return model.norm(hidden)


def _causal_without_mask(config, length: int) -> bool:
    """Whether attention without a mask computes what the model's own mask would give it."""
    if config._attn_implementation not in _CAUSAL_WITHOUT_MASK:
        return False
    layer_types = getattr(config, "layer_types", None) or []  # e.g. Qwen2 with use_sliding_window
    if any(kind != "full_attention" for kind in layer_types[: config.num_hidden_layers]):
        return False
    # Mistral slides every layer by config.sliding_window whatever layer_types says; Qwen2/3 set
    # it to None when they do not slide.
    window = getattr(config, "sliding_window", None)
    return window is None or length <= window
