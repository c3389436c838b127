"""What each protocol step trains and minimises (SPEC §3); the loop is radlads.train.Trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import RadladsForCausalLM
from ..train.losses import chunked_cross_entropy, chunked_kl
from .alignment import alignment_loss, student_attention_outputs, teacher_attention_io
from .teacher import teacher_hidden_states


def prepare_student(
    student: RadladsForCausalLM,
    activation_checkpointing: bool,
    compile: bool,
    keep_kernel_intermediates: bool = False,
) -> None:
    """The student's switches for training, as every step sets them (and the benchmarks do)."""
    if activation_checkpointing:  # transformers >= 5.2x renamed the switch
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
    # Under activation checkpointing a layer's kernels run forward again just before their backward,
    # one layer at a time: keeping their intermediates then costs one layer's worth, and saves
    # the kernels a third forward.
    student.keep_kernel_intermediates(keep_kernel_intermediates or activation_checkpointing)
    # Held-out evaluation runs the layers as training has them (compiled by `compile` or not, maybe
    # sharded), not through a second, inference-time compile.
    student.model.compiled_layers.enabled = False
    if compile:
        # Code compiled for an earlier step's student (other shapes, other inputs needing grad)
        # counts against Dynamo's recompile limit (8 per function), past which it runs eagerly
        # without a word: each step starts from an empty cache.
        torch.compiler.reset()
        student.compile_layers()


@dataclass
class AttentionAlignment:
    """Step 1: each student time mixer, fed the teacher's attention input, matches its output."""

    teacher: nn.Module
    compile: bool = True  # the loss's per-layer terms, on CUDA
    step: int = 1
    name: str = "attention alignment"

    def trainable(self, student: RadladsForCausalLM) -> list[nn.Parameter]:
        return [
            p
            for i, layer in enumerate(student.model.layers)
            if not student.config.is_softmax_layer(i)
            for p in layer.self_attn.parameters()
        ]

    def loss(self, student: RadladsForCausalLM, batch: Tensor) -> Tensor:
        io = teacher_attention_io(self.teacher, batch)
        return alignment_loss(student_attention_outputs(student, io), io.outputs, self.compile)


@dataclass
class Distillation:
    """Step 2: the whole student minimises KL(teacher || student) of next-token distributions."""

    teacher: nn.Module
    chunk_tokens: int = 4096
    compile: bool = True  # the loss's vocab-wide terms, on CUDA
    step: int = 2
    name: str = "distillation"

    def trainable(self, student: RadladsForCausalLM) -> list[nn.Parameter]:
        student.untie_embeddings()
        return list(student.parameters())

    def loss(self, student: RadladsForCausalLM, batch: Tensor) -> Tensor:
        # No cache, in eval mode too (held-out scoring of an uncompiled student): a loss needs no
        # state, and building one costs memory and time.
        with_grad = student.model(input_ids=batch, use_cache=False).last_hidden_state
        with torch.no_grad():
            teacher_hidden = teacher_hidden_states(self.teacher, batch)
        return chunked_kl(
            with_grad, student.lm_head, teacher_hidden, self.teacher.lm_head, self.chunk_tokens, self.compile
        )


@dataclass
class ContextExtension:
    """Step 3: plain next-token cross-entropy at long sequence length."""

    chunk_tokens: int = 4096
    compile: bool = True  # the loss's vocab-wide terms, on CUDA
    step: int = 3
    name: str = "context extension"

    def trainable(self, student: RadladsForCausalLM) -> list[nn.Parameter]:
        student.untie_embeddings()
        return list(student.parameters())

    def loss(self, student: RadladsForCausalLM, batch: Tensor) -> Tensor:
        hidden = student.model(input_ids=batch, use_cache=False).last_hidden_state
        return chunked_cross_entropy(hidden, student.lm_head, batch, self.chunk_tokens, self.compile)
