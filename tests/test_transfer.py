"""Step 0 on tiny random Qwen2, Qwen3 and Llama teachers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from radlads.convert.alignment import layer_cosines
from radlads.convert.transfer import transfer
from radlads.models import RadladsForCausalLM, UnsupportedTeacherError
from tiny_models import TEACHERS, make_teacher


@pytest.mark.parametrize("arch", ["rad-rwkv7", "rad-rwkv6"])
@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_every_teacher_tensor_is_copied_bit_identically(family, arch):
    teacher = make_teacher(family)
    student = transfer(teacher, arch=arch)
    theirs, ours = teacher.state_dict(), student.state_dict()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    new = set(ours) - set(theirs)
    assert new and all(".self_attn." in n for n in new)  # only time-mixer parameters are new
    # ... and they are the ones the student names as new (those StepConfig.new_lr_scale speeds up)
    names = {id(p): n for n, p in student.named_parameters()}
    assert {names[id(p)] for p in student.new_parameters()} == new
    assert student.config.tie_word_embeddings == teacher.config.tie_word_embeddings


@pytest.mark.parametrize("arch", ["rad-rwkv7", "rad-rwkv6"])
@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_first_layer_output_correlates_with_teacher(family, arch):
    teacher = make_teacher(family)
    student = transfer(teacher, arch=arch)
    ids = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(0))
    cosines = layer_cosines(teacher, student, ids)
    assert cosines[0] > 0.1, cosines


def test_hybrid_softmax_layer_reproduces_the_teacher_layer():
    teacher = make_teacher("qwen3")
    student = transfer(teacher, arch="rad-rwkv7", softmax_layers=[-1])
    ids = torch.randint(0, 320, (1, 32))
    cosines = layer_cosines(teacher, student, ids)
    assert cosines[-1] is None and student.config.softmax_layers == [2]
    # With every layer but one kept, the student is the teacher except layer 0's mixer.
    both = transfer(teacher, arch="rad-rwkv7", softmax_layers=[1, 2])
    layer = both.model.layers[2].self_attn
    x = torch.randn(1, 32, 64)
    pe = both.model.rotary_emb(x, torch.arange(32)[None])
    with torch.no_grad():
        ours, _, _ = layer(x, pe)
        theirs = teacher.model.layers[2].self_attn(
            hidden_states=x, position_embeddings=pe, attention_mask=None
        )[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_transfer_from_a_folder_round_trips_through_auto_classes(tmp_path):
    teacher = make_teacher("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    student = transfer(tmp_path / "teacher", arch="rad-rwkv6")
    student.save_pretrained(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert isinstance(loaded, RadladsForCausalLM)
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


def test_unsupported_teacher_names_the_supported_families():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedTeacherError, match="llama.*qwen2"):
        transfer(gpt2)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        transfer(tmp_path)


def test_softmax_layers_cannot_keep_every_layer():
    with pytest.raises(ValueError, match="nothing would be converted"):
        transfer(make_teacher("qwen2"), softmax_layers=[0, 1, 2])


def test_step1_activation_checkpointing_gives_the_same_gradients():
    from radlads.convert.alignment import alignment_loss, student_attention_outputs, teacher_attention_io

    teacher = make_teacher("qwen2")
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    io = teacher_attention_io(teacher, ids)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same init of the new parameters in both students
        student = transfer(teacher, arch="rad-rwkv7")
        if checkpointing:
            getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
        student.train()
        alignment_loss(student_attention_outputs(student, io), io.outputs).backward()
        grads.append({n: p.grad for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
