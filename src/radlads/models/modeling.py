"""The HF wrapper: RadladsModel / RadladsForCausalLM, a Llama-layout decoder whose attention
layers are RAD time mixers (or, in hybrids, the teacher's softmax attention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from . import prefill
from .attention import SoftmaxAttention
from .cache import RadladsCache
from .common import LinearMixer, LowRank, to_matmul_dtype
from .configuration import RadladsConfig
from .families import family_of
from .graphs import decode_graphs
from .rwkv6 import RadRWKV6Mixer
from .rwkv7 import RadRWKV7Mixer

MIXERS = {"rad-rwkv7": RadRWKV7Mixer, "rad-rwkv6": RadRWKV6Mixer}


@dataclass
class RadladsOutput(ModelOutput):
    last_hidden_state: Tensor | None = None
    cache: RadladsCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class RadladsCausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: RadladsCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None


class RadladsDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: RadladsConfig, layer_idx: int):
        super().__init__()
        teacher = config.teacher()
        family = family_of(teacher.model_type)
        first_linear = min(i for i in range(config.num_hidden_layers) if not config.is_softmax_layer(i))
        self.input_layernorm = family.norm(teacher)
        if config.is_softmax_layer(layer_idx):
            self.self_attn = SoftmaxAttention(config, layer_idx)
        else:
            self.self_attn = MIXERS[config.arch](config, layer_idx, first_linear)
        self.post_attention_layernorm = family.norm(teacher)
        self.mlp = family.mlp(teacher)

    def forward(
        self,
        hidden_states,
        position_embeddings,
        state=None,
        v_first=None,
        attention_mask=None,
        use_cache=False,
    ):
        """hidden states, v_first and (where `use_cache`) the layer's state after them: the state is
        an argument, not a cache lookup, so that one compiled graph serves every layer."""
        mixer_in = to_matmul_dtype(self.input_layernorm(hidden_states))
        attn, v_first, state = self.self_attn(
            mixer_in, position_embeddings, state, v_first, attention_mask, use_cache
        )
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + self.mlp(
            to_matmul_dtype(self.post_attention_layernorm(hidden_states))
        )
        return hidden_states, v_first, state


class RadladsPreTrainedModel(PreTrainedModel):
    config_class = RadladsConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RadladsDecoderLayer"]
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The RAD parameters have their own init (applied after their Linear children's generic one).
        if isinstance(module, (LinearMixer, LowRank)):
            module.init_parameters()


class RadladsModel(RadladsPreTrainedModel):
    def __init__(self, config: RadladsConfig):
        super().__init__(config)
        if not config.teacher_config:
            raise ValueError(
                "RadladsConfig needs teacher_config (build students with radlads.convert.transfer)"
            )
        teacher = config.teacher()
        family = family_of(teacher.model_type)
        self.embed_tokens = nn.Embedding(teacher.vocab_size, teacher.hidden_size, teacher.pad_token_id)
        self.layers = nn.ModuleList(RadladsDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = family.norm(teacher)
        self.rotary_emb = family.rotary(teacher)
        self.compiled_layers = prefill.CompiledLayers()
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: RadladsCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> RadladsOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = hidden.shape[:2]
        if use_cache is None:
            # Not while training: fla's training kernel (a custom op that compiled layers keep in
            # their graph) returns no final state, so a cache would cost training its fast path.
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = RadladsCache(self.config.num_hidden_layers)
        past = cache.seen_tokens if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=hidden.device)[None]
        if attention_mask is not None and T > 1 and self.config.softmax_layers and bool(attention_mask.all()):
            # No padding anywhere (generate() passes a mask of ones for unpadded prompts): without a
            # mask, whole-context softmax layers prefill through SDPA's causal kernel instead of a
            # [T, S] mask, gigabytes at long context (windowed ones build their window's mask, in
            # pieces). Decoding steps (T = 1) keep theirs: no sync per token.
            attention_mask = None
        pieces = [(0, T)]
        whole_context = self.config.softmax_layers and not self.config.softmax_window
        if not (torch.is_grad_enabled() or output_hidden_states or whole_context):
            pieces = prefill.spans(T, B, prefill.piece_tokens(self.config, B))
        # A forward without a cache that runs in pieces carries the state in one of its own.
        carried = cache if cache is not None or len(pieces) == 1 else RadladsCache(len(self.layers))
        outputs, all_hidden = [], None
        for start, end in pieces:
            mask = None if attention_mask is None else attention_mask[:, : attention_mask.shape[1] - T + end]
            out, all_hidden = self.run_layers(
                hidden[:, start:end], position_ids[:, start:end], mask, carried, output_hidden_states
            )
            outputs.append(out)
            prefill.keep_tail(outputs, logits_to_keep)
        hidden = torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0]
        if output_hidden_states:  # as in transformers' decoders, the last is the final norm's output
            hidden = self.norm(hidden)
            all_hidden = all_hidden[:-1] + (hidden,)
        # Else slice before the norm: a long prefill that needs one position's logits normalises one.
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        last = hidden if output_hidden_states else self.norm(hidden)
        return RadladsOutput(last_hidden_state=last, cache=cache, hidden_states=all_hidden)

    def run_layers(
        self,
        hidden: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None,
        cache: RadladsCache | None,
        output_hidden_states: bool | None,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """The decoder layers over `hidden`, continuing from `cache` (updated in place)."""
        position_embeddings = self.rotary_emb(hidden, position_ids)
        run = (
            self.compiled_layers if self.compiled_layers.applies(self.config, hidden) else prefill.call_layer
        )
        all_hidden = (hidden,) if output_hidden_states else None
        v_first = None
        for i, layer in enumerate(self.layers):
            state = cache.states[i] if cache is not None else None
            hidden, v_first, state = run(
                layer, hidden, position_embeddings, state, v_first, attention_mask, cache is not None
            )
            if cache is not None:
                cache.states[i] = state
            if output_hidden_states:
                all_hidden += (hidden,)
        if cache is not None:
            cache.seen_tokens += hidden.shape[1]
        return hidden, all_hidden


class RadladsForCausalLM(RadladsPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RadladsConfig):
        super().__init__(config)
        self.model = RadladsModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def compile_layers(self) -> None:
        """torch.compile each decoder layer and, for step 1, which runs it alone, each time mixer, in
        place, for training: their norms, projections' epilogues, gates and RoPE fuse into few
        kernels. The recurrence is a custom op there (RWKV-7) or a graph break (GLA with autograd,
        see radlads.kernels). Prompts at inference compile through models.prefill instead."""
        for layer in self.model.layers:
            layer.compile()
            layer.self_attn.compile()

    def keep_kernel_intermediates(self, keep: bool = True) -> None:
        """Whether the RWKV-7 mixers' fla kernels keep their forward's intermediates for backward
        (a faster backward for ~2.2 KB more activation memory per token, head and layer until it
        runs) or recompute them, fla's default. RAD-RWKV6's GLA kernels always recompute."""
        for module in self.modules():
            if isinstance(module, RadRWKV7Mixer):
                module.keep_kernel_intermediates = keep

    def new_parameters(self) -> list[nn.Parameter]:
        """The parameters with no counterpart in the teacher: the time mixers' decay, in-context
        rate, value residual, gate, k_k and k_a (StepConfig.new_lr_scale trains them faster)."""
        return [
            p
            for layer in self.model.layers
            if isinstance(layer.self_attn, LinearMixer)
            for p in layer.self_attn.new_parameters()
        ]

    def untie_embeddings(self) -> None:
        """Give the LM head its own copy of the embedding (SPEC: untied from step 2 on)."""
        if self.config.tie_word_embeddings or self.lm_head.weight is self.model.embed_tokens.weight:
            self.lm_head.weight = nn.Parameter(self.model.embed_tokens.weight.detach().clone())
            self.config.tie_word_embeddings = False

    @can_return_tuple
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: RadladsCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        past_key_values: RadladsCache | None = None,
        **kwargs,
    ) -> RadladsCausalLMOutput:
        cache = cache if cache is not None else past_key_values
        graphs = decode_graphs(self)
        if labels is None and not output_hidden_states and graphs.applies(self, input_ids, cache):
            logits = graphs(self, input_ids, cache, attention_mask, position_ids)
            if logits is not None:
                return RadladsCausalLMOutput(logits=logits, cache=cache)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
        )
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            # Summed over num_items_in_batch where given (HF's Trainer passes it to models that take
            # **kwargs, and then no longer divides by the gradient accumulation steps), else a mean.
            num_items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
                reduction="mean" if num_items is None else "sum",
            )
            if num_items is not None:
                loss = loss / torch.as_tensor(num_items, device=loss.device)
        return RadladsCausalLMOutput(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states
        )

    # --- generation: the state replaces the KV cache, so generate() must feed only new tokens ---

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: RadladsCache | None = None,
        past_key_values: RadladsCache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        cache = cache if cache is not None else past_key_values
        seen = cache.seen_tokens if cache is not None else 0
        inputs = {"cache": cache, "attention_mask": attention_mask, "use_cache": use_cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"], T = inputs_embeds, inputs_embeds.shape[1]
        else:
            # After a prompt of embeddings, generate()'s input_ids may hold only the tokens
            # generated since (then no more of them than the cache has seen): the prompt's length
            # counts in `seen` but not in them.
            prompt_as_embeds = inputs_embeds is not None and input_ids.shape[1] <= seen
            inputs["input_ids"] = input_ids[:, seen - inputs_embeds.shape[1] if prompt_as_embeds else seen :]
            T = inputs["input_ids"].shape[1]
        if attention_mask is not None:
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        # The rest go to forward, as transformers' own prepare_inputs_for_generation sends them:
        # generate's logits_to_keep=1 (a prompt's logits at its last position only), output_hidden_states.
        for key, value in kwargs.items():
            if key not in ("labels", "next_sequence_length", "is_first_iteration", "position_ids"):
                inputs.setdefault(key, value)
        return inputs

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1
    ):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        model_kwargs["cache"] = outputs.cache
        model_kwargs.pop("past_key_values", None)
        return model_kwargs

    def _reorder_cache(self, cache: RadladsCache | None, beam_idx: Tensor) -> RadladsCache | None:
        if cache is not None:  # None: generate(use_cache=False) runs the whole sequence each step
            cache.reorder_cache(beam_idx)
        return cache
