"""A tiny Llama written to GGUF in-process, with a byte-level BPE vocabulary (no download)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "a n"]
# SmolLM2's layout: distinct unknown, BOS and EOS tokens, and padding with EOS.
UNKNOWN, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = (UNKNOWN, BOS, EOS)


def tiny_vocab() -> tuple[list[str], list[int]]:
    """A byte-level BPE vocabulary: every byte, the merged pairs, and the control tokens."""
    tokens = list(bytes_to_unicode().values())
    tokens += ["".join(merge.split()) for merge in MERGES] + list(SPECIALS)
    types = [int(gguf.TokenType.NORMAL)] * (len(tokens) - len(SPECIALS))
    return tokens, types + [int(gguf.TokenType.CONTROL)] * len(SPECIALS)


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1; make them count in the comparison
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores Q and K rows interleaved for its rotary layout; transformers undoes this.
    halves = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model: LlamaForCausalLM, path: Path) -> None:
    cfg = model.config
    tokens, types = tiny_vocab()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_unk_token_id(tokens.index(UNKNOWN))
    writer.add_bos_token_id(tokens.index(BOS))
    writer.add_eos_token_id(tokens.index(EOS))
    writer.add_pad_token_id(tokens.index(EOS))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":  # tied: GGUF marks this by leaving output.weight out
            continue
        data = tensor.numpy().astype(np.float32)
        if "q_proj" in hf_name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif "k_proj" in hf_name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
