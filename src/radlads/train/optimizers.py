"""The optimizers a step can train with, and the bytes each keeps per trained parameter.

Every choice keeps fp32 master weights and fp32 gradients (an LR of 1e-5 would vanish in bf16
weights); they differ in how AdamW's two moments are stored:
- adamw             torch's fused AdamW, fp32 moments: 16 bytes per parameter in all;
- adamw-bf16-state  torchao's AdamW update (computed in fp32) with its moments stored in bf16: 12;
- adamw-8bit        torchao's AdamW8bit, moments quantised to 8 bits in blocks of 256 values, one
                    fp32 scale a block: ~10.
torchao (`pip install 'radlads[torchao]'`) compiles its update per parameter shape on first use.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import StepConfig

# Most precise first: "auto" (convert.batching) takes the first whose memory estimate fits.
OPTIMIZERS = ("adamw", "adamw-bf16-state", "adamw-8bit")
_MASTER_AND_GRAD = 4 + 4
STATE_BYTES = {
    "adamw": _MASTER_AND_GRAD + 2 * 4,
    "adamw-bf16-state": _MASTER_AND_GRAD + 2 * 2,
    "adamw-8bit": _MASTER_AND_GRAD + 2 * (1 + 4 / 256),
}
DEFAULT = "adamw"


def check_optimizer(name: str) -> str:
    if name != "auto" and name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose auto or one of {', '.join(OPTIMIZERS)}")
    return name


def installed() -> tuple[str, ...]:
    """The optimizers this environment can build, most precise first: torchao's only where it is
    installed ("auto" never chooses one that would fail to build)."""
    return OPTIMIZERS if importlib.util.find_spec("torchao") is not None else (DEFAULT,)


def resolve_optimizer(name: str) -> str:
    """`name`, with "auto" (where nothing sized the step: a Trainer built directly) as DEFAULT."""
    return DEFAULT if check_optimizer(name) == "auto" else name


def param_groups(
    params: list[nn.Parameter], new: list[nn.Parameter], new_lr_scale: float, weight_decay: float = 0.0
) -> list[dict]:
    """`params` as optimizer groups, each with the `lr_scale` by which the trainer multiplies the
    step's LR: those in `new` at `new_lr_scale`, the rest at 1 (empty groups left out). At scale 1
    all go in one group, so that the optimizer state matches that of checkpoints written before
    the groups existed.

    With `weight_decay`, only tensors of 2 or more dims (matrices: projections, LoRA factors,
    embeddings, the LM head) decay: the others (RMSNorm gains, biases, the mixers' w0, a0, v0, k_k
    and k_a) go in groups of their own with no decay, as RWKV's trainers have them. Decaying those
    changes what the layer computes (w0 pulled towards 0 shortens every channel's memory). Without
    decay the groups are those above."""
    is_new = {id(p) for p in new} if new_lr_scale != 1 else set()
    spared = {id(p) for p in params if p.ndim < 2} if weight_decay else set()
    groups = []
    for new_ones, scale in ((False, 1.0), (True, new_lr_scale)):
        for spare in (False, True):
            members = [p for p in params if (id(p) in is_new) == new_ones and (id(p) in spared) == spare]
            groups.append({"params": members, "lr_scale": scale} | ({"weight_decay": 0.0} if spare else {}))
    return [g for g in groups if g["params"]]


def build_optimizer(
    name: str, params: list[nn.Parameter] | list[dict], cfg: StepConfig
) -> torch.optim.Optimizer:
    """`params`: parameters, or param_groups' groups."""
    name = resolve_optimizer(name)
    hyper = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if name == "adamw":
        # fused on CPU too: one update path, with the non-finite check on the device
        return torch.optim.AdamW(params, **hyper, fused=True)
    optim = _torchao_optim(name)
    if name == "adamw-8bit":
        return optim.AdamW8bit(params, **hyper)
    return _bf16_state_adamw()(params, **hyper)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group's LR to `lr` times the group's `lr_scale` (param_groups)."""
    for group in optimizer.param_groups:
        group_lr = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):  # torchao's: a tensor, so its compiled update takes any LR
            group["lr"].fill_(group_lr)
        else:
            group["lr"] = group_lr


def _torchao_optim(name: str):
    try:
        import torchao.optim
    except ImportError as err:
        raise RuntimeError(
            f"optimizer {name} needs torchao: pip install 'radlads[torchao]' (or choose adamw)"
        ) from err
    return torchao.optim


@functools.cache
def _bf16_state_adamw() -> type[torch.optim.Optimizer]:
    """torchao's AdamW with bf16 moments: its update reads each moment as fp32 and stores it back
    rounded to bf16. Tensors under 4096 values keep fp32 moments (torchao's rule; a few KB)."""
    from torchao.optim.adam import _AdamBase

    class AdamWBf16State(_AdamBase):
        def __init__(self, params, lr: float, betas: tuple[float, float], weight_decay: float):
            super().__init__(
                params,
                lr,
                betas,
                1e-8,
                weight_decay,
                False,
                block_size=1,
                bf16_stochastic_round=False,
                is_adamw=True,
            )

        @staticmethod
        def _subclass_zeros(p: torch.Tensor, signed: bool, block_size: int) -> torch.Tensor:
            return torch.zeros_like(p, dtype=torch.bfloat16)

    return AdamWBf16State
