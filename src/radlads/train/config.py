"""Typed run configuration: dataclasses with SPEC defaults, loadable from YAML, token counts with
k/M/B suffixes."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .optimizers import check_optimizer

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


def coerce_floats(config: Any) -> None:
    """Numbers in a dataclass's float fields: YAML 1.1 (PyYAML) reads 1e-3, written without a dot,
    as a string, which would fail far into a run."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type in ("float", "float | None") and value is not None and not isinstance(value, float):
            try:
                setattr(config, f.name, float(value))
            except (TypeError, ValueError):
                raise ValueError(f"{f.name} {value!r} is not a number; write it as 0.001 or 1.0e-3") from None


def parse_tokens(value: str | int | float) -> int:
    """'200k' -> 200000, '1.5M' -> 1500000, 0 -> 0."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", value)
    if not match:
        raise ValueError(
            f"cannot read token count {value!r}: use a number with an optional k/M/B suffix, e.g. 200k"
        )
    return int(float(match.group(1)) * _SUFFIX[match.group(2).lower()])


@dataclass
class StepConfig:
    """One training step of the protocol. `tokens` is the budget; 0 skips the step."""

    tokens: int
    lr: float
    lr_final: float | None = None  # cosine decay to this value; None keeps the LR flat
    seq_len: int = 512
    # Sequences per optimizer update, over all processes. With batch_size None the micro-batch is
    # chosen to fit the device (convert.batching) and accumulation makes up the rest.
    global_batch_size: int = 128
    batch_size: int | None = None  # sequences per micro-batch and process; None: the largest that fits
    grad_accum: int = 1  # micro-batches per update where batch_size is given
    warmup_tokens: int = 0
    weight_decay: float = 0.0  # on matrices only: norms, biases and the mixers' vectors never decay
    # The LR of the parameters step 0 creates (RadladsForCausalLM.new_parameters), as a multiple of
    # the step's: they start from an init, the others from the teacher's trained weights.
    new_lr_scale: float = 1.0
    # The fraction of training windows shown as a span of text twice, so that the student sees the
    # teacher copy from context (data.PackedLoader).
    repeat_fraction: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    checkpoint_every: int = 20_000_000  # tokens
    log_every: int = 10  # optimizer steps
    heldout_batches: int = 4  # held-out batches scored at the start and end of the step
    # train.optimizers.OPTIMIZERS, or "auto": the most precise whose memory estimate fits (convert.batching)
    optimizer: str = "auto"

    def __post_init__(self):
        check_optimizer(self.optimizer)
        coerce_floats(self)
        if not 0.0 <= self.repeat_fraction <= 1.0:
            raise ValueError(
                f"repeat_fraction {self.repeat_fraction} is not a fraction: give a value from 0 to 1 "
                "(--stepK-repeat-fraction)"
            )
        for name in ("seq_len", "global_batch_size", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"{name} {value} is not a count: give 1 or more (--{name.replace('_', '-')})"
                )
        self.tokens = parse_tokens(self.tokens)
        self.warmup_tokens = parse_tokens(self.warmup_tokens)
        self.checkpoint_every = parse_tokens(self.checkpoint_every)
        self.betas = tuple(float(b) for b in self.betas)

    @property
    def tokens_per_update(self) -> int:
        """Tokens per update and process (batch_size must be resolved)."""
        if self.batch_size is None:
            raise ValueError("the micro-batch is not chosen yet (convert.batching.size_step)")
        return self.seq_len * self.batch_size * self.grad_accum


def _step1() -> StepConfig:
    return StepConfig(tokens=100_000_000, lr=1e-3, lr_final=1e-5)


def _step2() -> StepConfig:
    return StepConfig(tokens=250_000_000, lr=1e-5)


def _step3() -> StepConfig:
    return StepConfig(tokens=0, lr=1e-5, seq_len=16384, global_batch_size=8)


@dataclass
class ConvertConfig:
    """Everything `radlads convert` needs; the defaults are the paper's protocol."""

    teacher: str = ""
    data: str = ""
    out: str = ""
    arch: str = "rad-rwkv7"
    student: dict[str, Any] = field(
        default_factory=dict
    )  # RadladsConfig options (softmax_layers, ranks, ...)
    step1: StepConfig = field(default_factory=_step1)
    step2: StepConfig = field(default_factory=_step2)
    step3: StepConfig = field(default_factory=_step3)
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available
    activation_checkpointing: bool = False
    # RAD-RWKV7 on fla: keep the recurrence's forward intermediates for backward instead of
    # recomputing them: faster updates for ~2.2 KB more activation memory per token, head and layer
    # (always on with activation_checkpointing, where it costs one layer's worth).
    keep_kernel_intermediates: bool = False
    compile: bool = True  # on CUDA, torch.compile the student's layers (one process) and the losses
    held_out_fraction: float = 0.01
    kl_chunk_tokens: int = 4096  # rows of [tokens, vocab] logits materialised at once in KL / CE
    # The teacher folder holds a config.json only: build the teacher from it with random weights,
    # on the device (throughput runs at a model's exact shape; nothing such a run learns is useful).
    random_teacher_weights: bool = False

    def __post_init__(self):
        coerce_floats(self)

    def steps(self) -> dict[int, StepConfig]:
        return {1: self.step1, 2: self.step2, 3: self.step3}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        defaults = cls()
        step_keys = {f.name for f in dataclasses.fields(StepConfig)}
        for name in ("student", "step1", "step2", "step3"):
            if not isinstance(data.get(name) or {}, dict):
                raise ValueError(f"{name} must be a mapping of settings, not {data[name]!r}")
        for name in ("step1", "step2", "step3"):
            if name in data:
                given = data[name] or {}
                unknown = sorted(set(given) - step_keys)
                if unknown:
                    raise ValueError(f"unknown {name} keys {unknown}; known keys: {sorted(step_keys)}")
                base = dataclasses.asdict(getattr(defaults, name))
                data[name] = StepConfig(**{**base, **given})
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ConvertConfig:
        return cls.from_dict(read_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config's keys as written (what it leaves out is not filled in)."""
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys at the top level")
    return data
