"""Pieces every student attention layer shares: the teacher's q/k/v/o projections with RoPE and
GQA, and the low-rank ("LoRA") maps that produce RWKV's data-dependent parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from ..kernels import autocast_dtype
from .configuration import RadladsConfig
from .families import family_of

ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}


class LowRank(nn.Module):
    """x -> act(x A) B. A starts at zero and B small, so the map outputs exactly 0 at step 0 while
    both factors still receive gradient (B's through A's first update, A's through B)."""

    def __init__(self, dim_in: int, rank: int, dim_out: int, activation: str | None = None):
        super().__init__()
        self.down = nn.Linear(dim_in, rank, bias=False)
        self.up = nn.Linear(rank, dim_out, bias=False)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.up_from(self.down(x))

    def up_from(self, h: Tensor) -> Tensor:
        """The map's second half, from h = x A computed elsewhere (fused_linears)."""
        act = ACTIVATIONS.get(self.activation)
        return self.up(act(h) if act else h)

    def init_parameters(self) -> None:
        init.zeros_(self.down.weight)
        init.orthogonal_(self.up.weight, gain=0.1)


# The submodules a time mixer copies from the teacher's attention (step 0); the rest are new.
TEACHER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


class TeacherProjections(nn.Module):
    """q/k/v/o exactly as the teacher has them (names, biases, per-head q/k norms, RoPE).

    The linear mixers use q_proj as the SPEC's receptance Wr: keeping the teacher's names makes
    step 0 a copy of same-named tensors.
    """

    def __init__(self, config: RadladsConfig, layer_idx: int):
        super().__init__()
        teacher = config.teacher()
        self.family = family_of(teacher.model_type)
        self.rope = self.family.rope()
        self.layer_idx = layer_idx
        self.num_heads = teacher.num_attention_heads
        self.num_kv_heads = teacher.num_key_value_heads or self.num_heads
        self.head_dim = config.head_dim
        C, H, Hkv, N = teacher.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        qkv_bias, o_bias = self.family.biases(teacher)
        self.q_proj = nn.Linear(C, H * N, bias=qkv_bias)
        self.k_proj = nn.Linear(C, Hkv * N, bias=qkv_bias)
        self.v_proj = nn.Linear(C, Hkv * N, bias=qkv_bias)
        self.o_proj = nn.Linear(H * N, C, bias=o_bias)
        if self.family.qk_norm:
            self.q_norm = self.family.norm(teacher, N)
            self.k_norm = self.family.norm(teacher, N)

    def project(self, x: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as [B, T, heads, N]: q with H heads, k and v with H_kv heads, RoPE applied."""
        return self.to_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), position_embeddings)

    def to_heads(self, q: Tensor, k: Tensor, v: Tensor, position_embeddings) -> tuple[Tensor, Tensor, Tensor]:
        """project's second half, from the three projections [B, T, heads * N]."""
        B, T, _ = q.shape
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        if self.family.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, k, *position_embeddings, unsqueeze_dim=2)  # q, k are [B, T, heads, N]
        return q, k, v

    def expand_kv(self, x: Tensor) -> Tensor:
        """[B, T, H_kv, N] -> [B, T, H, N]; query head h reads KV head h // G, as in HF's repeat_kv."""
        return x.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)


def decay_speed_schedule(
    layer_idx: int, num_layers: int, dim: int, base: float, span: float, power, heads: int = 1
) -> Tensor:
    """RWKV's per-channel decay speeds: slow in early channels, fast in late ones, varying by depth.
    With `heads` > 1 each head's channels run the whole schedule (see RadladsConfig.decay_init)."""
    depth = layer_idx / max(num_layers - 1, 1)
    per = dim // heads
    n = torch.arange(per, dtype=torch.float32) / max(per - 1, 1)
    return (base + span * n ** power(depth)).repeat(heads)


def fused_linears(x: Tensor, maps: list[nn.Linear]) -> list[Tensor]:
    """[m(x) for m in maps]; when x's gradient is wanted, or under torch.compile without autograd
    (compiled decoding), as one matmul with the maps' weights stacked.

    A time mixer's maps of its input (the q/k/v projections, the gate, the LoRAs' first factors)
    are ~2,200 output columns in seven matmuls at the Qwen2.5-0.5B shape, five of them narrow (GQA's
    k and v, the LoRAs' 32-64 columns): each reads all of x for little arithmetic, and in backward
    each writes its own [B, T, C] input gradient, then summed. One matmul reads x once and writes
    one input gradient (step 2 on an H100: 1.025-1.04x, docs/benchmarks.md). Where x needs no gradient
    (step 1, where x is the teacher's hidden state) the separate maps win: the stacked weight's
    gradient needs the maps' output gradients gathered into one tensor first, which cost more there
    than the saved reads of x (0.97x). Eager generation runs each map alone too: stacking would
    copy the weights at every token. A compiled decoding step stacks them: a one-token step pays
    a fixed time per kernel, and the copy (one fused kernel) costs less than six matmul launches."""
    stack = x.requires_grad if torch.is_grad_enabled() else torch.compiler.is_compiling()
    if not stack or len(maps) < 2:
        return [m(x) for m in maps]
    weight = torch.cat([m.weight for m in maps])
    bias = None
    if any(m.bias is not None for m in maps):
        bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in maps])
    return list(F.linear(x, weight, bias).split([m.out_features for m in maps], dim=-1))


def to_matmul_dtype(x: Tensor) -> Tensor:
    """`x` in the dtype autocast gives matmuls (unchanged outside autocast), for a tensor that several
    matmuls read. Left to autocast, each matmul casts its own copy, and in backward each one's input
    gradient is cast back to fp32 before they are summed: ~10 [B, T, C] casts a layer. The price:
    those gradients are summed in bf16, then cast once; on a tiny CPU model the bf16 gradients'
    error against fp32 was 3-5% with and without this."""
    dtype = autocast_dtype(x.device.type)
    return x if dtype is None else x.to(dtype)


class LinearMixer(TeacherProjections):
    """What both RAD time mixers do around their recurrence: heads in, state in/out, gate out."""

    def __init__(self, config: RadladsConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.config = config
        D = self.num_heads * self.head_dim
        self.out_norm = nn.GroupNorm(self.num_heads, D, eps=64e-5) if config.groupnorm else None

    def new_parameters(self) -> list[nn.Parameter]:
        """The parameters step 0 initialises instead of copying them from the teacher's attention."""
        return [p for name, p in self.named_parameters() if name.split(".")[0] not in TEACHER_MODULES]

    @property
    def scale(self) -> float:
        return 1.0 if self.out_norm is not None else self.head_dim**-0.5

    def decay_schedule(self, base: float, span: float, power) -> Tensor:
        """This layer's w0 at init: decay_speed_schedule over its heads' channels, as decay_init says."""
        heads = self.num_heads if self.config.decay_init == "per-head" else 1
        dim = self.num_heads * self.head_dim
        return decay_speed_schedule(
            self.layer_idx, self.config.num_hidden_layers, dim, base, span, power, heads
        )

    def read_input(self, x: Tensor, *maps: nn.Linear) -> list[Tensor]:
        """The teacher's q, k, v projections of x, then each of `maps` applied to x (fused_linears)."""
        return fused_linears(x, [self.q_proj, self.k_proj, self.v_proj, *maps])

    def heads(self, q: Tensor, k: Tensor, v: Tensor, position_embeddings, attention_mask: Tensor | None):
        """r, k, v as [B, T, H, N] from the q, k, v projections, k and v expanded to all query heads."""
        r, k, v = self.to_heads(q, k, v, position_embeddings)
        k, v = self.expand_kv(k), self.expand_kv(v)
        if attention_mask is not None:  # padded positions must not write into the state
            keep = attention_mask[:, -q.shape[1] :, None, None].to(k.dtype)
            k, v = k * keep, v * keep
        return r, k, v

    def recur(
        self, op, *args, state: Tensor | None, use_cache: bool, **options
    ) -> tuple[Tensor, Tensor | None]:
        """Run a kernel op from `state` (zeros where None); y, and the final state where `use_cache`."""
        return op(
            *args,
            **options,
            scale=self.scale,
            initial_state=state,
            output_final_state=use_cache,
            backend=self.config.kernel_backend,
        )

    def output(self, y: Tensor, gate: Tensor) -> Tensor:
        B, T = y.shape[:2]
        y = y.reshape(B, T, -1)
        if self.out_norm is not None:
            y = self.out_norm(y.view(B * T, -1)).view(B, T, -1)
        return self.o_proj(y * gate)
