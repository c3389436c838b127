"""Step 0 — attention weight transfer: build the student from the teacher and copy every weight
that has a counterpart (SPEC §3). Instant; no training."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..models import RadladsConfig, RadladsForCausalLM, family_of
from ..models.configuration import check_window
from .inputs import check_finite, check_shapes


def load_teacher(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    random_weights: bool = False,
    seed: int = 0,
) -> PreTrainedModel:
    """A teacher HF folder (config.json + safetensors) as a frozen eval-mode model, checked first
    (see inputs.py). With `random_weights`, built from config.json alone with the family's random
    init (from `seed`, the same teacher in every process), directly on `device`: no init on the
    host, nor a copy of a 7B's weights from it."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model folder (no config.json); pass a folder saved with "
            "save_pretrained, or a .gguf file through radlads.teachers.resolve_teacher"
        )
    family_of(AutoConfig.from_pretrained(path).model_type)  # fail early, naming the supported families
    if random_weights:
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        check_shapes(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
        check_finite(model, path)
    model.requires_grad_(False).eval()
    return model.to(device) if device else model


def student_config(teacher: PreTrainedModel, arch: str = "rad-rwkv7", **options) -> RadladsConfig:
    tcfg = teacher.config
    family_of(tcfg.model_type)
    n = tcfg.num_hidden_layers
    layers = list(options.pop("softmax_layers", ()))
    outside = [i for i in layers if not -n <= i < n]
    if outside:  # counting from 1 would otherwise keep layer 0 without a word
        raise ValueError(
            f"softmax_layers {outside} are not layers of the teacher's {n}: give indices from 0 to "
            f"{n - 1}, or from -1 (the last) to -{n}"
        )
    softmax = sorted({i % n for i in layers})
    if len(softmax) == n:
        raise ValueError("softmax_layers keeps every layer: nothing would be converted")
    check_window(
        softmax, options.get("softmax_window"), options.get("softmax_sinks", 4), "softmax_sinks" in options
    )
    return RadladsConfig(arch=arch, teacher_config=tcfg.to_dict(), softmax_layers=softmax, **options)


def transfer(teacher: PreTrainedModel | str | Path, arch: str = "rad-rwkv7", **options) -> RadladsForCausalLM:
    """Teacher module or HF folder -> RadladsForCausalLM with the teacher's weights copied.

    Options are RadladsConfig fields (softmax_layers, decay_rank, groupnorm, init_v0, ...);
    negative softmax_layers count from the end (-1 keeps the last layer's attention).
    """
    if not isinstance(teacher, nn.Module):
        teacher = load_teacher(teacher)
    config = student_config(teacher, arch, **options)
    param = next(teacher.parameters())
    with torch.device(param.device):  # build in place, in the teacher's dtype: no fp32 copy on the host
        student = RadladsForCausalLM._from_config(config, dtype=param.dtype)
    copy_teacher_weights(teacher, student)
    return student


def copy_teacher_weights(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Copy every same-named tensor (student layers keep the teacher's names); return their names.

    A name present in both with another shape is a bug in the student, not a choice: raise.
    """
    source = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if name not in source:
                continue
            if source[name].shape != tensor.shape:
                raise RuntimeError(
                    f"shape mismatch for {name}: teacher {source[name].shape}, student {tensor.shape}"
                )
            tensor.copy_(source[name])
            copied.append(name)
    missing = [n for n in source if n not in copied and not n.endswith("rotary_emb.inv_freq")]
    if missing:
        raise RuntimeError(f"teacher tensors without a counterpart in the student: {missing[:5]}")
    return copied
