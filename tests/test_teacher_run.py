"""The teacher as training runs it (radlads.convert.teacher): the same hidden states as
transformers' own forward, without its attention-mask construction where that mask is plain causal,
and compiled whole layer by whole layer for step 2."""

from __future__ import annotations

import pytest
import torch
import transformers.masking_utils

from radlads.convert.teacher import TEACHER_LAYER_PARTS, prepare_teacher, teacher_hidden_states
from tiny_models import make_teacher


@pytest.fixture
def mask_builds(monkeypatch) -> list[int]:
    """Counts transformers' packed-sequence checks: the mask construction step that reads a GPU
    value on the host."""
    calls = []
    check = transformers.masking_utils.find_packed_sequence_indices

    def counted(*args, **kwargs):
        calls.append(1)
        return check(*args, **kwargs)

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", counted)
    return calls


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_teacher_hidden_states_match_transformers_without_building_a_mask(family, mask_builds):
    teacher = make_teacher(family)
    teacher.set_attn_implementation("sdpa")
    ids = torch.randint(0, teacher.config.vocab_size, (2, 17))
    with torch.no_grad():
        want = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        built = len(mask_builds)
        got = teacher_hidden_states(teacher, ids)
    assert built > 0 and len(mask_builds) == built  # transformers built one; the fast path did not
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "attn,overrides",
    [
        ("eager", {}),  # eager attention without a mask would attend to the future
        ("sdpa", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),  # layers that slide
        ("sdpa", dict(family="mistral", sliding_window=4, layer_types=["full_attention"] * 3)),  # all slide
    ],
    ids=["eager-attention", "sliding-window", "mistral-window"],
)
def test_teacher_hidden_states_fall_back_where_the_mask_is_not_plain_causal(attn, overrides, mask_builds):
    """Mistral slides every layer whatever `layer_types` (kept from a config.json) says."""
    teacher = make_teacher(**{"family": "qwen2", **overrides})
    teacher.set_attn_implementation(attn)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 17))
    with torch.no_grad():
        want = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        built = len(mask_builds)
        got = teacher_hidden_states(teacher, ids)
    assert len(mask_builds) > built
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_whole_layer_compile_matches_eager_once_for_all_layers_and_undoes():
    """Step 2's teacher: each decoder layer one compiled graph, the same code for all 10 layers
    (past Dynamo's recompile limit of 8 if it specialised per layer); compile=False restores it."""
    torch._dynamo.reset()
    teacher = make_teacher("qwen2", num_hidden_layers=10)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = teacher_hidden_states(teacher, ids)
        prepare_teacher(teacher, compile=True, whole_layers=True)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            got = teacher_hidden_states(teacher, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    layer = teacher.model.layers[0]
    assert "forward" in vars(layer) and all(
        "forward" not in vars(getattr(layer, p)) for p in TEACHER_LAYER_PARTS
    )
    prepare_teacher(teacher, compile=False)
    assert "forward" not in vars(layer)


def test_teacher_hidden_states_with_a_padding_mask_are_transformers_own():
    teacher = make_teacher("qwen2")
    teacher.set_attn_implementation("sdpa")
    ids = torch.randint(0, teacher.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        want = teacher.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        got = teacher_hidden_states(teacher, ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
