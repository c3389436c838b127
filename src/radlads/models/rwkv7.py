"""RAD-RWKV7 ("RADGoose") time mixer: the RWKV-7 delta rule on the teacher's projections.

Per token, per head (SPEC §2): r, k, v from the teacher's q/k/v with its RoPE and GQA; decay
log w = -exp(-0.5 - softplus(-d)), d = w0 + tanh(x W1) W2; in-context rate a = sigmoid(a0 + x A1 A2);
removal key kappa = l2norm(k * k_k); k <- k * (1 + (a - 1) * k_a); value residual to layer 0's v;
S_t = S diag(w) + S (-kappa)(kappa a)^T + v k^T, y = S r; no token shift, no bonus.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from ..kernels import kernel_inputs, rwkv7_recurrence
from .common import LinearMixer, LowRank
from .configuration import RadladsConfig

# log_decay's values lie in (-exp(-0.5), 0) = (-0.6065, 0); a floor just below lets fla's chunked
# kernel take its faster scheme (kernels.rwkv7_recurrence).
LOG_W_MIN = -0.61


class RadRWKV7Mixer(LinearMixer):
    def __init__(self, config: RadladsConfig, layer_idx: int, first_linear_layer: int):
        super().__init__(config, layer_idx)
        C, D = config.hidden_size, self.num_heads * self.head_dim
        self.holds_v_first = layer_idx == first_linear_layer
        self.w0 = nn.Parameter(torch.empty(D))
        self.w_lora = LowRank(C, config.decay_rank, D, activation="tanh")
        self.a0 = nn.Parameter(torch.empty(D))
        self.a_lora = LowRank(C, config.iclr_rank, D)
        if not self.holds_v_first:
            self.v0 = nn.Parameter(torch.empty(D))
            self.v_lora = LowRank(C, config.value_rank, D)
        self.k_k = nn.Parameter(torch.empty(D))
        self.k_a = nn.Parameter(torch.empty(D))
        # Full-rank gate sigmoid(x Wg) by default (SPEC); gate_rank switches to sigmoid(x G1) G2.
        self.gate = (
            nn.Linear(C, D, bias=False)
            if config.gate_rank is None
            else LowRank(C, config.gate_rank, D, activation="sigmoid")
        )
        # A training switch, not saved with the model: RadladsForCausalLM.keep_kernel_intermediates.
        self.keep_kernel_intermediates = False

    def init_parameters(self) -> None:
        """Start near the teacher: LoRAs output 0, decay from RWKV-7's speed schedule, gate 1/2."""
        init.copy_(self.w0, self.decay_schedule(base=-6.5, span=5.0, power=lambda d: 0.85 + d**0.5))
        init.constant_(self.a0, self.config.init_a0)
        init.constant_(self.k_k, self.config.init_k_k)
        init.constant_(self.k_a, self.config.init_k_a)
        if not self.holds_v_first:
            init.constant_(self.v0, self.config.init_v0)
        loras = [self.w_lora, self.a_lora] + ([] if self.holds_v_first else [self.v_lora])
        for lora in loras + ([self.gate] if isinstance(self.gate, LowRank) else []):
            lora.init_parameters()
        if isinstance(self.gate, nn.Linear):
            init.zeros_(self.gate.weight)
        else:  # sigmoid(0) G2 = 1/2 needs G2's rows to sum to 1; its orthogonal part breaks symmetry
            with torch.no_grad():
                self.gate.up.weight.add_(1 / self.gate.up.in_features)

    def log_decay(self, w_lora_out: Tensor) -> Tensor:
        """log w from the decay LoRA's output (w_lora(x))."""
        d = self.w0 + w_lora_out.float()
        return -torch.exp(-0.5 - F.softplus(-d))

    def forward(
        self,
        x: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        state: Tensor | None = None,
        v_first: Tensor | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """y, v_first (layer 0's v, which later layers mix in) and, where `use_cache`, the state
        after x (from `state`, zeros where None)."""
        B, T, _ = x.shape
        heads = (B, T, self.num_heads, self.head_dim)
        gate_in = self.gate if isinstance(self.gate, nn.Linear) else self.gate.down
        loras = [self.w_lora, self.a_lora] + ([] if self.holds_v_first else [self.v_lora])
        q, k, v, gate, *downs = self.read_input(x, gate_in, *(lora.down for lora in loras))
        w_out, a_out, *v_out = (lora.up_from(h) for lora, h in zip(loras, downs))
        gate = torch.sigmoid(gate) if isinstance(self.gate, nn.Linear) else self.gate.up_from(gate)
        r, k, v = self.heads(q, k, v, position_embeddings, attention_mask)
        log_w = self.log_decay(w_out).view(heads)
        a = torch.sigmoid(self.a0 + a_out).view(heads)
        kappa = F.normalize(k * self.k_k.view(heads[2:]), dim=-1)
        k = k * (1 + (a - 1) * self.k_a.view(heads[2:]))
        if self.holds_v_first:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + v_out[0]).view(heads)
        inputs = kernel_inputs(r, log_w, k, v, -kappa, kappa * a)  # here: see kernel_inputs
        y, state = self.recur(
            rwkv7_recurrence,
            *inputs,
            state=state,
            use_cache=use_cache,
            log_w_min=LOG_W_MIN,
            recompute=not self.keep_kernel_intermediates,
        )
        return self.output(y, gate), v_first, state
