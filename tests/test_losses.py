"""The chunked vocab losses equal the plain full-logit ones, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from radlads.train.losses import (
    _addmm_into,
    chunked_cross_entropy,
    chunked_kl,
    compiled,
    cross_entropy_terms,
    kl_terms,
)


def heads(seed: int, C: int = 16, V: int = 50):
    torch.manual_seed(seed)
    return nn.Linear(C, V, bias=False), nn.Linear(C, V, bias=False)


@pytest.mark.parametrize("chunk", [7, 64])  # several chunks with a ragged last one; one chunk
def test_chunked_kl_matches_full_kl(chunk):
    student_head, teacher_head = heads(0)
    s = torch.randn(2, 11, 16, requires_grad=True)
    t = torch.randn(2, 11, 16)
    loss = chunked_kl(s, student_head, t, teacher_head, chunk)
    loss.backward()
    grads = s.grad.clone(), student_head.weight.grad.clone()
    assert teacher_head.weight.grad is None  # the teacher is a target, not trained
    s.grad, student_head.weight.grad = None, None
    t_logp = F.log_softmax(teacher_head(t), -1).flatten(0, 1)
    s_logp = F.log_softmax(student_head(s), -1).flatten(0, 1)
    expected = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], s.grad)
    torch.testing.assert_close(grads[1], student_head.weight.grad)


@pytest.mark.parametrize("chunk", [5, 64])
def test_chunked_cross_entropy_matches_full_cross_entropy(chunk):
    head, _ = heads(1)
    h = torch.randn(3, 9, 16, requires_grad=True)
    ids = torch.randint(0, 50, (3, 9))
    loss = chunked_cross_entropy(h, head, ids, chunk)
    loss.backward()
    grads = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    expected = F.cross_entropy(head(h)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], h.grad)
    torch.testing.assert_close(grads[1], head.weight.grad)


def test_without_gradients_the_loss_is_the_same():
    student_head, teacher_head = heads(2)
    s, t = torch.randn(1, 10, 16), torch.randn(1, 10, 16)
    with torch.no_grad():
        plain = chunked_kl(s, student_head, t, teacher_head, 3)
    torch.testing.assert_close(plain, chunked_kl(s, student_head, t, teacher_head, 3).detach())


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
def test_bf16_autocast_gradients_are_close_to_fp32(device):
    """Under bf16 autocast (on CUDA, the head's gradient summed by cuBLAS into fp32 over chunks,
    and the terms from the Triton kernel training runs)."""
    student_head, teacher_head = heads(3, C=32, V=300)
    student_head, teacher_head = student_head.to(device), teacher_head.to(device)
    s = torch.randn(4, 16, 32, device=device, requires_grad=True)
    t = torch.randn(4, 16, 32, device=device)
    chunked_kl(s, student_head, t, teacher_head, 24).backward()
    fp32 = s.grad.clone(), student_head.weight.grad.clone()
    s.grad, student_head.weight.grad = None, None
    with torch.autocast(device, dtype=torch.bfloat16):  # on CUDA, the terms' Triton kernel too
        chunked_kl(s, student_head, t, teacher_head, 24, compile=device == "cuda").backward()
    assert s.grad.dtype == s.dtype and student_head.weight.grad.dtype == torch.float32
    for got, want in zip((s.grad, student_head.weight.grad), fp32):
        assert (got - want).norm() / want.norm() < 3e-2
    if device == "cuda" and torch.__version__ >= "2.11":  # the torch the project's GPUs run
        assert _addmm_into(torch.float32, torch.bfloat16, s.device)  # the fused fp32 accumulation ran


def test_compiled_cross_entropy_terms_equal_eager_ones():
    """CUDA runs step 3's loss terms through torch.compile (one graph, no breaks; step 2's KL
    terms have their Triton kernel): same values and logit gradients as the eager function,
    here compiled for the CPU."""
    torch.manual_seed(4)
    logits, target = torch.randn(6, 300).bfloat16(), torch.randint(0, 300, (6,))
    for rows in (6, 4):  # a second shape (a ragged last chunk) must not fail the one-graph rule
        eager = cross_entropy_terms(logits[:rows], target[:rows])
        fused = compiled(cross_entropy_terms)(logits[:rows], target[:rows])
        assert fused[1].dtype == torch.bfloat16
        torch.testing.assert_close(fused[0], eager[0])
        torch.testing.assert_close(fused[1], eager[1], rtol=1.6e-2, atol=1e-3)


def test_compiled_alignment_term_has_the_eager_value_and_gradient():
    """Step 1's per-layer term through torch.compile on CUDA (autograd through the compiled graph):
    the same value and student gradient as eager, here compiled for the CPU."""
    from radlads.convert.alignment import layer_alignment_loss

    torch.manual_seed(5)
    teacher_out = torch.randn(2, 7, 32).bfloat16()
    grads = []
    for fn in (layer_alignment_loss, compiled(layer_alignment_loss)):
        student_out = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(6)).bfloat16()
        student_out.requires_grad_(True)
        loss = fn(student_out, teacher_out)
        loss.backward()
        grads.append((loss.detach(), student_out.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1.6e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vocab", [1000, 151936])  # one ragged block; the Qwen2.5 vocabulary
def test_triton_kl_terms_match_the_reference(vocab):
    """The Triton kernel step 2 runs on CUDA against kl_terms on the same bf16 logits: one row
    peaked far above the rest (exp would overflow without the running maximum), one nearly flat."""
    from radlads.kernels.kl_div import kl_terms_triton

    torch.manual_seed(7)
    s = (3 * torch.randn(5, vocab, device="cuda")).bfloat16()
    t = (3 * torch.randn(5, vocab, device="cuda")).bfloat16()
    s[0, 3], t[0, 3] = 200.0, 150.0
    s[1], t[1] = s[1] * 1e-3, t[1] * 1e-3
    want_loss, want_grad = kl_terms(s, t)
    loss, grad = kl_terms_triton(s, t)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1.6e-2, atol=1e-5)
    # what step 2 does: the gradient over the student's logits, from a strided view of a buffer
    wide = torch.zeros(5, vocab + 8, device="cuda", dtype=torch.bfloat16)
    wide[:, :vocab] = s
    loss, grad = kl_terms_triton(wide[:, :vocab], t, out=wide[:, :vocab])
    assert grad.data_ptr() == wide.data_ptr()
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1.6e-2, atol=1e-5)
    with pytest.raises(ValueError, match="unit column stride"):
        kl_terms_triton(s.T, t.T)


@pytest.mark.parametrize("objective", ["distillation", "context extension"])
def test_held_out_losses_run_the_student_without_a_cache(objective, monkeypatch):
    """Held-out evaluation of an uncompiled student runs steps 2 and 3's losses in eval mode, where
    a bare forward returns a cache: the losses ask for none, so that evaluation keeps no state."""
    from radlads.convert.steps import ContextExtension, Distillation
    from radlads.convert.transfer import transfer
    from radlads.models import modeling
    from tiny_models import make_teacher

    teacher = make_teacher("qwen2").eval()
    student = transfer(teacher, arch="rad-rwkv7").eval()
    loss = (
        Distillation(teacher, compile=False)
        if objective == "distillation"
        else ContextExtension(compile=False)
    )

    def no_cache(*args, **kwargs):
        raise AssertionError("a loss built a cache")

    monkeypatch.setattr(modeling, "RadladsCache", no_cache)
    batch = torch.randint(0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(loss.loss(student, batch))
