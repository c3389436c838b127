"""Passkey retrieval: can the model recall a 5-digit key hidden at some depth of a long filler text?

The prompt is the usual one from the long-context literature (Mohtashami & Jaggi, 2023). Lengths are
counted in the evaluated model's own tokenizer, so teacher and student see identical prompts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FILLER = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: str
    depth: float  # where the needle sits, 0 = right after the intro, 1 = right before the question
    target_tokens: int
    n_tokens: int  # actual length in the tokenizer, special tokens included


@dataclass
class PasskeyResult:
    records: list[dict] = field(default_factory=list)  # one per prompt: length, depth, key, answer, correct

    def accuracy_by_length(self) -> dict[int, float]:
        return self._accuracy("length")

    def accuracy_by_depth(self) -> dict[float, float]:
        return self._accuracy("depth")

    def _accuracy(self, key: str) -> dict:
        groups: dict = {}
        for record in self.records:
            groups.setdefault(record[key], []).append(record["correct"])
        return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _passkey_text(n_filler: int, depth: float, key: str) -> str:
    filler = [FILLER[i % len(FILLER)] for i in range(n_filler)]
    split = round(depth * n_filler)
    return INTRO + "".join(filler[:split]) + NEEDLE.format(key=key) + "".join(filler[split:]) + QUESTION


def make_passkey_prompt(
    tokenizer, target_tokens: int, depth: float, key: str, tolerance: float = 0.02
) -> PasskeyPrompt:
    """A prompt of about `target_tokens` tokens with `key` at `depth`.

    Filler sentences are the unit of length; tokenization is close to additive over them, so a few
    corrections from a measured tokens-per-sentence rate land within `tolerance`.
    """
    per_sentence = _count_tokens(tokenizer, "".join(FILLER) * 20) / (20 * len(FILLER))
    n_filler = 0
    for _ in range(8):
        n_tokens = _count_tokens(tokenizer, _passkey_text(n_filler, depth, key))
        if abs(n_tokens - target_tokens) <= tolerance * target_tokens:
            break
        n_filler = max(0, n_filler + round((target_tokens - n_tokens) / per_sentence))
    text = _passkey_text(n_filler, depth, key)
    return PasskeyPrompt(text, key, depth, target_tokens, _count_tokens(tokenizer, text))


@torch.no_grad()
def _answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    # One prompt at a time: batching unequal lengths would need left padding, which a recurrent
    # student should never be asked to handle.
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate_passkey(
    model,
    tokenizer,
    lengths: Sequence[int] = (1024, 4096, 16384, 32768),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    *,
    trials: int = 1,
    seed: int = 0,
    max_new_tokens: int = 10,  # room for a space and 5 single-digit tokens
    progress: bool = True,
) -> PasskeyResult:
    """Greedy-decode the key for every (length, depth, trial); correct iff the first number matches."""
    model.eval()
    rng = random.Random(seed)
    result = PasskeyResult()
    grid = [(length, depth) for length in lengths for depth in depths for _ in range(trials)]
    for length, depth in tqdm(grid, disable=not progress, desc="passkey"):
        prompt = make_passkey_prompt(tokenizer, length, depth, key=str(rng.randint(10000, 99999)))
        answer = _answer(model, tokenizer, prompt.text, max_new_tokens)
        found = re.search(r"\d+", answer)
        result.records.append(
            {
                "length": length,
                "depth": depth,
                "n_tokens": prompt.n_tokens,
                "key": prompt.key,
                "answer": answer,
                "correct": found is not None and found.group() == prompt.key,
            }
        )
    return result
