"""Teacher attention inputs/outputs and the student time mixers run on them (step 0 report, step 1).

The teacher's attention I/O is captured with forward hooks during its ordinary forward, so it is
exactly what the teacher computes, whatever its transformers version passes between modules.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..models import RadladsForCausalLM
from ..train.losses import maybe_compiled
from .teacher import teacher_hidden_states


@dataclass
class AttentionIO:
    inputs: list[Tensor]  # per layer: the normed hidden states the attention layer received
    outputs: list[Tensor]  # per layer: what the teacher's attention returned (before the residual add)


def attention_input(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a teacher attention layer was called with, as a forward hook sees them."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def teacher_attention_io(teacher, input_ids: Tensor, attention_mask: Tensor | None = None) -> AttentionIO:
    io = AttentionIO([], [])

    def hook(module, args, kwargs, output):
        io.inputs.append(attention_input(args, kwargs))
        io.outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [
        layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in teacher.model.layers
    ]
    try:
        with torch.no_grad():
            teacher_hidden_states(teacher, input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    return io


def student_attention_outputs(
    student: RadladsForCausalLM,
    io: AttentionIO,
    position_ids: Tensor | None = None,
    layers: Collection[int] | None = None,
) -> list[Tensor | None]:
    """Each student time mixer applied to its teacher layer's input; None for kept softmax layers
    (and, given `layers`, for mixers not listed: the first mixer runs anyway, for v_first).

    The value residual's v_first comes from the student's own first mixer on the teacher's input,
    as it would in the student's forward. With the student's gradient checkpointing on, each mixer
    keeps only its input and recomputes its activations in backward.
    """
    x0 = io.inputs[0]
    if position_ids is None:
        position_ids = torch.arange(x0.shape[1], device=x0.device)[None]
    position_embeddings = student.model.rotary_emb(x0, position_ids)
    outs, v_first, first_ran = [], None, False
    # transformers >= 5.2x renamed the flag
    checkpointing = getattr(student, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = student.is_gradient_checkpointing
    for idx, layer in enumerate(student.model.layers):
        unlisted = layers is not None and idx not in layers and first_ran
        if student.config.is_softmax_layer(idx) or unlisted:
            outs.append(None)
            continue
        mixer = layer.self_attn
        if checkpointing and torch.is_grad_enabled():
            y, v_first, _ = checkpoint(
                mixer, io.inputs[idx], position_embeddings, None, v_first, use_reentrant=False
            )
        else:
            y, v_first, _ = mixer(io.inputs[idx], position_embeddings, v_first=v_first)
        outs.append(y)
        first_ran = True
    return outs


def layer_alignment_loss(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """One layer's term of the step-1 loss: mean over tokens of ||y_t - y_s||_2 * C^-1/2."""
    diff = teacher_out.float() - student_out.float()
    return diff.norm(dim=-1).mean() * teacher_out.shape[-1] ** -0.5


def alignment_loss(
    student_out: list[Tensor | None], teacher_out: list[Tensor], compile: bool = False
) -> Tensor:
    """SPEC step-1 loss: the layer terms summed over the converted layers. With `compile` (on CUDA)
    each term is one fused kernel forward and one backward instead of a dozen fp32 passes over
    the layer's [B, T, C] outputs."""
    term = maybe_compiled(layer_alignment_loss, teacher_out[0], compile)
    return torch.stack([term(s, t) for s, t in zip(student_out, teacher_out) if s is not None]).sum()


@torch.no_grad()
def layer_cosines(teacher, student: RadladsForCausalLM, input_ids: Tensor) -> list[float | None]:
    """Mean per-token cosine between teacher attention output and student mixer output, per layer."""
    io = teacher_attention_io(teacher, input_ids)
    return [
        None if s is None else F.cosine_similarity(s.float(), t.float(), dim=-1).mean().item()
        for s, t in zip(student_attention_outputs(student, io), io.outputs)
    ]
