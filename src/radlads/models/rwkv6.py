"""RAD-RWKV6 ("RADFinch") time mixer: RWKV-6 data-dependent decay on the teacher's projections.

Per token, per head (SPEC §2): r, k, v from the teacher's q/k/v with its RoPE and GQA;
log w = -exp(w0 + tanh(x W1) W2); key tied to decay k <- k (1 - w); S_t = S diag(w) + v k^T,
y = S r N^-1/2 (a gated-linear-attention recurrence, no bonus u); gate sigmoid(tanh(x G1) G2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import initialization as init

from ..kernels import gla_recurrence, kernel_inputs
from .common import LinearMixer, LowRank
from .configuration import RadladsConfig


class RadRWKV6Mixer(LinearMixer):
    def __init__(self, config: RadladsConfig, layer_idx: int, first_linear_layer: int):
        super().__init__(config, layer_idx)
        C, D = config.hidden_size, self.num_heads * self.head_dim
        self.w0 = nn.Parameter(torch.empty(D))
        self.w_lora = LowRank(C, config.decay_rank, D, activation="tanh")
        self.gate = LowRank(C, config.gate_rank, D, activation="tanh")

    def init_parameters(self) -> None:
        """Start near the teacher: LoRAs output 0, decay from RWKV-6's speed schedule, gate 1/2."""
        init.copy_(self.w0, self.decay_schedule(base=-6.0, span=5.0, power=lambda d: 0.7 + 1.3 * d))
        self.w_lora.init_parameters()
        self.gate.init_parameters()

    def log_decay(self, w_lora_out: Tensor) -> Tensor:
        """log w from the decay LoRA's output (w_lora(x))."""
        return -torch.exp(self.w0 + w_lora_out.float())

    def forward(
        self,
        x: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        state: Tensor | None = None,
        v_first: Tensor | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """y, v_first passed through (RWKV-6 has no value residual), and where `use_cache` the state."""
        B, T, _ = x.shape
        q, k, v, gate, w_down = self.read_input(x, self.gate.down, self.w_lora.down)
        r, k, v = self.heads(q, k, v, position_embeddings, attention_mask)
        log_w = self.log_decay(self.w_lora.up_from(w_down)).view(B, T, self.num_heads, self.head_dim)
        k = k * -torch.expm1(log_w).to(k.dtype)  # 1 - w, accurate when w is close to 1
        inputs = kernel_inputs(r, log_w, k, v)  # here: see kernel_inputs
        y, state = self.recur(gla_recurrence, *inputs, state=state, use_cache=use_cache)
        return self.output(y, torch.sigmoid(self.gate.up_from(gate))), v_first, state
