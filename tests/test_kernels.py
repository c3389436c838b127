"""Every kernel path against the per-token loop: prefill, prefill with carried state, decoding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from radlads.convert.transfer import transfer
from radlads.kernels import fla_available, gla_recurrence, resolve_backend, rwkv7_recurrence
from radlads.kernels.reference import recurrent_chunked, recurrent_loop
from radlads.models.rwkv7 import LOG_W_MIN
from tiny_models import make_teacher


def random_inputs(B, T, H, K, V, delta_rule: bool, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    # RAD-RWKV7's decay range (0.545, 1); RWKV-6's can be much stronger.
    log_w = -torch.exp(-0.5 - F.softplus(-rnd(B, T, H, K) * 2)) if delta_rule else -torch.exp(rnd(B, T, H, K))
    args = [r, log_w, k, v]
    if delta_rule:
        kappa = F.normalize(rnd(B, T, H, K), dim=-1)
        iclr = torch.sigmoid(rnd(B, T, H, K))
        args += [-kappa, kappa * iclr]
    state = rnd(B, H, K, V) * 0.1
    cast = [x.to(device=device, dtype=dtype if i != 1 else torch.float32) for i, x in enumerate(args)]
    return cast, state.to(device)


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 70),
    H=st.integers(1, 3),
    K=st.sampled_from([4, 8, 16]),
    delta_rule=st.booleans(),
    chunk=st.sampled_from([4, 16, 32]),
    with_state=st.booleans(),
)
def test_chunked_matches_loop(B, T, H, K, delta_rule, chunk, with_state):
    args, state = random_inputs(B, T, H, K, K, delta_rule, seed=T * 7 + K)
    h0 = state if with_state else None
    y_ref, h_ref = recurrent_loop(*args, scale=0.3, initial_state=h0, output_final_state=True)
    y, h = recurrent_chunked(*args, scale=0.3, initial_state=h0, output_final_state=True, chunk_size=chunk)
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(h, h_ref) < 1e-4


@pytest.mark.parametrize("delta_rule", [False, True])
def test_chunked_gradients_match_loop(delta_rule):
    args, state = random_inputs(1, 21, 2, 8, 8, delta_rule, seed=3)
    grads = []
    for op in (recurrent_loop, recurrent_chunked):
        leaves = [x.clone().requires_grad_() for x in args]
        h0 = state.clone().requires_grad_()
        y, h = op(*leaves, scale=0.5, initial_state=h0, output_final_state=True)
        (y.square().sum() + h.sum()).backward()
        grads.append([x.grad for x in leaves] + [h0.grad])
    for g_loop, g_chunk in zip(*grads):
        assert rel_err(g_chunk, g_loop) < 1e-4


@pytest.mark.parametrize("log_w", [-0.6, -40.0])
def test_chunked_products_stay_finite_for_any_decay(log_w):
    """RAD-RWKV7's decays take the factored (matmul) products; decays too strong for fp32 factors
    (RWKV-6's can be) take the masked pairwise form and stay exact."""
    args, _ = random_inputs(1, 70, 2, 8, 8, False, seed=6)
    args[1] = torch.full_like(args[1], log_w)
    y_ref, h_ref = recurrent_loop(*args, output_final_state=True)
    y, h = recurrent_chunked(*args, output_final_state=True, chunk_size=64)
    assert rel_err(y, y_ref) < 1e-4 and rel_err(h, h_ref) < 1e-4


@pytest.mark.parametrize("delta_rule", [False, True])
def test_split_prefill_and_decode_match_one_pass(delta_rule):
    """Chunked prefill of a prefix, then token-by-token from the carried state == one pass."""
    args, _ = random_inputs(2, 30, 2, 8, 8, delta_rule, seed=5)
    y_full, h_full = recurrent_chunked(*args, output_final_state=True)
    y_pre, h = recurrent_chunked(*[x[:, :17] for x in args], output_final_state=True)
    ys = [y_pre]
    for t in range(17, 30):
        y_t, h = recurrent_loop(*[x[:, t : t + 1] for x in args], initial_state=h, output_final_state=True)
        ys.append(y_t)
    assert rel_err(torch.cat(ys, 1), y_full) < 1e-5
    assert rel_err(h, h_full) < 1e-5


@pytest.mark.parametrize("backend", ["chunked", "loop"])
def test_references_check_the_declared_decay_floor(backend):
    args, _ = random_inputs(1, 20, 2, 8, 8, True, seed=3)  # RAD-RWKV7's range: log_w > -exp(-0.5)
    y, _ = rwkv7_recurrence(*args, backend=backend, log_w_min=LOG_W_MIN)
    torch.testing.assert_close(y, rwkv7_recurrence(*args, backend=backend)[0])
    args[1] = args[1] * 2  # now down to -1.2
    with pytest.raises(ValueError, match="log_w_min"):
        rwkv7_recurrence(*args, backend=backend, log_w_min=LOG_W_MIN)


def test_inputs_take_autocast_dtype_before_the_kernel():
    """Under autocast every backend gets its inputs in autocast's dtype, as fla's dots need; the
    cast happens outside the compiler-opaque kernel call, where compiled layers fuse it."""
    args, _ = random_inputs(1, 12, 2, 8, 8, True, seed=4)  # fp32, as fp32 master weights give
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = rwkv7_recurrence(*args, backend="chunked")
        expected, _ = rwkv7_recurrence(*[x.bfloat16() for x in args], backend="chunked")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_rad_rwkv7_decay_never_falls_below_its_declared_floor():
    """The floor RAD-RWKV7 passes to fla must hold for any parameters, after the cast to bf16 too."""
    student = transfer(make_teacher("qwen2"), arch="rad-rwkv7")
    mixer = student.model.layers[0].self_attn
    x = torch.randn(2, 5, student.config.hidden_size) * 100
    with torch.no_grad():
        for w0 in (-1e4, -50.0, 0.0, 50.0, 1e4):  # from no decay to the strongest the form allows
            mixer.w0.fill_(w0)
            log_w = mixer.log_decay(mixer.w_lora(x))
            for value in (log_w, log_w.bfloat16(), log_w.half()):
                assert value.min() >= LOG_W_MIN and value.max() <= 0


def test_fla_receives_the_floor_as_lower_bound(monkeypatch):
    """radlads.kernels.fla_ops hands the floor to fla's chunked RWKV-7 kernel (fla, which it imports
    when called, is replaced by a recording stub: this runs without CUDA)."""
    import sys
    import types

    from radlads.kernels import fla_ops

    calls = []

    def record(name):
        return lambda *args, **kwargs: calls.append((name, kwargs)) or (args[0], None)

    for name in ("fla", "fla.ops", "fla.ops.gla", "fla.ops.rwkv7"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    stubs = {
        "fla.ops.gla": ("chunk_gla", "fused_recurrent_gla"),
        "fla.ops.rwkv7": ("chunk_rwkv7", "fused_recurrent_rwkv7"),
    }
    for module, ops in stubs.items():
        for op in ops:
            setattr(sys.modules[module], op, record(op))
    args, _ = random_inputs(1, 40, 2, 8, 8, True)
    fla_ops.dplr(*args, log_w_min=LOG_W_MIN)
    with torch.no_grad():
        fla_ops.dplr(*[x[:, :1] for x in args], log_w_min=LOG_W_MIN)  # one token, no grad: decoding
    assert [name for name, _ in calls] == ["chunk_rwkv7", "fused_recurrent_rwkv7"]
    assert calls[0][1]["lower_bound"] == LOG_W_MIN


def test_dispatch_names_and_errors():
    assert resolve_backend("auto", on_cuda=False) == "chunked"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("triton", on_cuda=False)
    with pytest.raises(RuntimeError, match="chunked"):
        resolve_backend("fla", on_cuda=False)


needs_fla = pytest.mark.skipif(
    not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and flash-linear-attention"
)


def ieee_fp32(dtype, monkeypatch) -> None:
    """Triton's fp32 dots default to tf32 (~1e-3); the SPEC's fp32 bound (1e-4) needs IEEE fp32.
    bf16 runs keep the default: the setting changes the compiled kernels, so that fla may autotune
    them again (minutes on a fresh machine; bf16 tests under it did not finish in 180 s) instead of
    reusing the training benchmark's results (.gpu-cache)."""
    if dtype == torch.float32:
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")


# Few shapes: every new shape costs Triton compilations (minutes on a fresh GPU host).
SHAPES = [(2, 200, 3, 64), (1, 33, 2, 32)]


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("delta_rule", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fla_matches_reference(shape, delta_rule, dtype, tol, monkeypatch):
    ieee_fp32(dtype, monkeypatch)
    B, T, H, K = shape
    op = rwkv7_recurrence if delta_rule else gla_recurrence
    floor = dict(log_w_min=LOG_W_MIN) if delta_rule else {}  # what RAD-RWKV7 passes: fla's fast scheme
    args, state = random_inputs(B, T, H, K, K, delta_rule, device="cuda", dtype=dtype, seed=T)
    ref_args = [x.double().float() for x in args]
    split = T // 2

    def run(backend, xs, h0=None):
        return op(*xs, scale=K**-0.5, initial_state=h0, output_final_state=True, backend=backend, **floor)

    with torch.no_grad():
        # prefill
        y, h = run("fla", args)
        y_ref, h_ref = run("loop", ref_args)
        errors = {"prefill": rel_err(y, y_ref), "prefill state": rel_err(h, h_ref)}
        # prefill with a carried state, then single-token decoding (fused recurrent kernel)
        _, h = run("fla", [x[:, :split] for x in args], state)
        ys = []
        for t in range(split, T):
            y_t, h = run("fla", [x[:, t : t + 1] for x in args], h)
            ys.append(y_t)
        carried = run("loop", [x[:, :split] for x in ref_args], state)[1]
        y_ref, h_ref = run("loop", [x[:, split:] for x in ref_args], carried)
        errors.update({"decode": rel_err(torch.cat(ys, 1), y_ref), "decode state": rel_err(h, h_ref)})
    print(f"fla vs loop {shape} delta_rule={delta_rule} {dtype}: {errors}")
    assert max(errors.values()) < tol, errors


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "delta_rule,recompute,stateful",
    [(False, True, True), (True, True, True), (True, False, True), (True, True, False), (True, False, False)],
    ids=["gla", "rwkv7", "rwkv7-kept", "rwkv7-op", "rwkv7-op-kept"],
)
def test_fla_gradients_match_reference(delta_rule, recompute, stateful, dtype, tol, monkeypatch):
    """Training runs fla's chunked backward (in bf16 under autocast), recomputing its forward's
    intermediates or keeping them: its gradients must match the fp32 reference's on the same input
    values. Without a state (training), RWKV-7 runs as the custom op radlads::rwkv7_chunk."""
    ieee_fp32(dtype, monkeypatch)
    op = rwkv7_recurrence if delta_rule else gla_recurrence
    floor = dict(log_w_min=LOG_W_MIN, recompute=recompute) if delta_rule else {}
    args, state = random_inputs(2, 96, 2, 64, 64, delta_rule, device="cuda", dtype=dtype, seed=11)
    carried = dict(initial_state=state, output_final_state=True) if stateful else {}
    grads = []
    for backend, inputs in (("fla", args), ("chunked", [x.float() for x in args])):
        leaves = [x.clone().requires_grad_() for x in inputs]
        y, _ = op(*leaves, scale=0.125, backend=backend, **carried, **floor)
        y.square().sum().backward()
        grads.append([x.grad for x in leaves])
    errors = [rel_err(g_fla, g_ref) for g_fla, g_ref in zip(*grads)]
    print(f"fla vs chunked gradients delta_rule={delta_rule} recompute={recompute} {dtype}: {errors}")
    assert max(errors) < tol, errors


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "kept"])
def test_training_call_goes_to_tilelang_with_its_inputs_in_place(recompute, monkeypatch):
    """Where fla's TileLang backend takes the call, training's RWKV-7 call runs its function with
    r, log_w, k, v, a, b in their places (a stand-in computing with the reference: a swap would
    change the output), dense inputs (the mixers' can be column slices), the chunk size fla took,
    the floor, and whether to keep its intermediates."""
    import fla_stand_in
    import radlads.kernels
    from radlads.kernels import fla_ops

    fla_stand_in.install(monkeypatch)
    monkeypatch.setattr(radlads.kernels, "_fla_runs", lambda backend, on_cuda: backend == "fla")
    monkeypatch.setattr(fla_ops, "tilelang_chunk_size", lambda *shape: 32)
    args, _ = random_inputs(2, 40, 2, 16, 16, True, seed=6)
    sliced = [torch.cat([x, x], dim=-1)[..., :16] for x in args]  # same values, not contiguous
    results = []
    for backend, values in (("fla", sliced), ("chunked", args)):
        leaves = [x.detach().requires_grad_() for x in values]  # detach keeps the slices' strides
        y, _ = rwkv7_recurrence(
            *leaves, scale=0.25, backend=backend, log_w_min=LOG_W_MIN, recompute=recompute
        )
        y.square().sum().backward()
        results.append([y, *(x.grad for x in leaves)])
    assert fla_stand_in.TILELANG_CALLS == [dict(chunk_size=32, keep=not recompute, lower_bound=LOG_W_MIN)]
    assert max(rel_err(got, ref) for got, ref in zip(*results)) < 1e-5


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "kept"])
def test_tilelang_kernels_where_fla_takes_them_match_reference_in_one_graph(recompute):
    """Where fla's TileLang backend is installed and takes training's RWKV-7 call (a grid of at
    least half the SMs), rwkv7_recurrence runs it: compiled in one graph (fullgraph), with
    output and gradients matching the fp32 reference's."""
    from radlads.kernels.fla_ops import tilelang_chunk_size

    B, T, H, K = 12, 128, 6, 64  # B x H = 72 >= half an H100's 132 SMs
    if tilelang_chunk_size(B, H, K, K, torch.bfloat16, torch.device("cuda"), LOG_W_MIN) is None:
        pytest.skip("fla's TileLang backend is not installed here or does not take this call")
    args, _ = random_inputs(B, T, H, K, K, True, device="cuda", dtype=torch.bfloat16, seed=5)

    def run(*xs, backend="fla"):
        y, _ = rwkv7_recurrence(*xs, scale=K**-0.5, backend=backend, log_w_min=LOG_W_MIN, recompute=recompute)
        return y

    results = []
    compiled = torch.compile(run, fullgraph=True)  # fails on a graph break
    for fn, inputs, backend in ((compiled, args, "fla"), (run, [x.float() for x in args], "chunked")):
        leaves = [x.clone().requires_grad_() for x in inputs]
        y = fn(*leaves, backend=backend)
        y.float().square().sum().backward()
        results.append([y, *(x.grad for x in leaves)])
    errors = [rel_err(got, ref) for got, ref in zip(*results)]
    print(f"tilelang vs chunked recompute={recompute}: {errors}")
    assert max(errors) < 3e-2, errors


@pytest.fixture(params=["stand-in", pytest.param("fla", marks=[pytest.mark.gpu, needs_fla])])
def op_device(request, monkeypatch) -> str:
    """Where radlads::rwkv7_chunk runs: on CPU around a stand-in for fla (tests/fla_stand_in.py:
    the op's own machinery), on CUDA around fla itself."""
    if request.param == "fla":
        return "cuda"
    import fla_stand_in
    import radlads.kernels

    fla_stand_in.install(monkeypatch)
    monkeypatch.setattr(radlads.kernels, "_fla_runs", lambda backend, on_cuda: True)
    return "cpu"


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "kept"])
def test_rwkv7_chunk_op_passes_opcheck(op_device, keep):
    """The custom op's schema, fake (meta) outputs, autograd registration and traced forms agree
    with what it does (torch.library.opcheck runs each)."""
    args, _ = random_inputs(2, 96, 2, 64, 64, True, device=op_device, dtype=torch.bfloat16, seed=3)
    leaves = [x.bfloat16().requires_grad_() for x in args]
    torch.library.opcheck(torch.ops.radlads.rwkv7_chunk, (*leaves, 0.125, LOG_W_MIN, keep))


@pytest.mark.parametrize("stateful", [False, True], ids=["from-zero", "from-state"])
@pytest.mark.parametrize("delta_rule", [False, True], ids=["gla", "rwkv7"])
def test_recurrence_fwd_op_passes_opcheck(op_device, delta_rule, stateful):
    """radlads::recurrence_fwd (every fla call without autograd): schema, fake outputs and traced
    forms agree with what it does."""
    args, state = random_inputs(2, 96, 2, 64, 64, delta_rule, device=op_device, dtype=torch.bfloat16, seed=4)
    args = [x.bfloat16() for x in args]
    a, b = args[4:] if delta_rule else (None, None)
    floor = LOG_W_MIN if delta_rule else None
    with torch.no_grad():
        inputs = (*args[:4], a, b, 0.125, state if stateful else None, floor)
        torch.library.opcheck(torch.ops.radlads.recurrence_fwd, inputs)


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "kept"])
def test_compiled_rwkv7_layers_have_no_graph_break_at_the_recurrence(op_device, keep):
    """A compiled RAD-RWKV7 layer is one graph through the recurrence (a break per layer left step
    2's forward host-bound on fla), and training through it gives eager's gradients."""
    from torch._dynamo.utils import counters

    teacher = make_teacher("qwen2", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    eager = transfer(teacher, arch="rad-rwkv7").to(op_device).train()
    eager.keep_kernel_intermediates(keep)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_layers()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 96), device=op_device)
    for model in (eager, compiled):
        with torch.autocast(op_device, dtype=torch.bfloat16):
            loss = model(input_ids=ids).logits.float().square().mean()
        loss.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    grads = [
        (p.grad, q.grad) for p, q in zip(eager.parameters(), compiled.parameters()) if p.grad is not None
    ]
    error = rel_err(torch.cat([q.flatten() for _, q in grads]), torch.cat([p.flatten() for p, _ in grads]))
    assert error < 2e-2, error


@pytest.mark.gpu
@needs_fla
def test_fla_follows_autocast_dtype():
    """fp32 inputs under bf16 autocast (fp32 master weights promote r, k, v) must run the bf16
    kernels, exactly as bf16 inputs do, not fp32 ones."""
    op = rwkv7_recurrence
    args, state = random_inputs(2, 64, 2, 64, 64, True, device="cuda", dtype=torch.float32, seed=5)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = op(*args, scale=0.125, initial_state=state, backend="fla", log_w_min=LOG_W_MIN)
    y_bf16, _ = op(
        *[x.bfloat16() for x in args], scale=0.125, initial_state=state, backend="fla", log_w_min=LOG_W_MIN
    )
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_bf16, rtol=0, atol=0)


def slow_decay_inputs(T: int, seed: int, device="cpu", dtype=torch.float32):
    """Trained students' decays: most channels keep over hundreds of tokens (log w in (-0.02, 0)),
    so that what a chunk's outputs owe to earlier chunks is large. `random_inputs`' decays forget
    within a chunk and cannot tell a kernel that drops the carried state from one that keeps it."""
    args, _ = random_inputs(1, T, 2, 64, 64, True, device=device, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    args[1] = (-0.02 * torch.rand(args[1].shape, generator=g)).to(device)
    args[5] = args[5] * 0.1  # a light delta rule, as RAD-RWKV7 starts (a = sigmoid(a0) small)
    return args


def far_gradients(op, args, tail: int, far: int, **kwargs) -> list[torch.Tensor]:
    """Gradients of a loss on the last `tail` outputs at the first `far` tokens: only the state
    carried across chunks takes them there. r is left out: it reaches only its own token's output."""
    leaves = [x.clone().requires_grad_() for x in args]
    y, _ = op(*leaves, scale=0.125, **kwargs)
    y[:, -tail:].float().square().sum().backward()
    return [x.grad[:, :far] for x in leaves[1:]]


def dropped_state_outputs(args, chunk: int) -> torch.Tensor:
    """The loop's outputs with the state zeroed at every chunk start: what a kernel that loses the
    carried state would give."""
    return torch.cat(
        [
            recurrent_loop(*[x[:, s : s + chunk] for x in args], scale=0.125)[0]
            for s in range(0, args[0].shape[1], chunk)
        ],
        1,
    )


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_fla_outputs_keep_far_context(grad):
    """Slow decays (trained students'), 512 tokens: fla's outputs, as evaluation (no autograd:
    radlads::recurrence_fwd) and training (autograd: radlads::rwkv7_chunk) call it, must match the
    fp32 loop's and sit far from those of a kernel that drops the state between chunks."""
    args = slow_decay_inputs(512, seed=5, device="cuda", dtype=torch.bfloat16)
    ref_args = [x.float() for x in args]
    with torch.set_grad_enabled(grad):
        y = rwkv7_recurrence(*args, scale=0.125, backend="fla", log_w_min=LOG_W_MIN)[0]
    y_ref = recurrent_loop(*ref_args, scale=0.125)[0]
    tail = slice(448, 512)
    dropped = rel_err(dropped_state_outputs(ref_args, 64)[:, tail], y_ref[:, tail])
    assert dropped > 0.3, dropped  # the test's power: the carried state matters here
    assert rel_err(y[:, tail], y_ref[:, tail]) < 2e-2, rel_err(y[:, tail], y_ref[:, tail])


def test_chunked_gradients_reach_across_chunks():
    args = slow_decay_inputs(160, seed=3)
    loop = far_gradients(recurrent_loop, args, tail=16, far=96)
    chunked = far_gradients(recurrent_chunked, args, tail=16, far=96, chunk_size=32)
    for g_chunk, g_loop in zip(chunked, loop):
        assert g_loop.norm() > 0
        assert rel_err(g_chunk, g_loop) < 1e-4


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "kept"])
def test_fla_gradients_reach_across_chunks(recompute):
    """A loss on the last tokens only: the gradients at tokens many chunks earlier flow through the
    carried state alone, and must match the fp32 reference's."""
    args = slow_decay_inputs(512, seed=3, device="cuda", dtype=torch.bfloat16)
    options = dict(log_w_min=LOG_W_MIN, recompute=recompute)
    fla = far_gradients(rwkv7_recurrence, args, tail=32, far=384, backend="fla", **options)
    ref = far_gradients(rwkv7_recurrence, [x.float() for x in args], tail=32, far=384, backend="chunked")
    for name, g_fla, g_ref in zip(("log_w", "k", "v", "a", "b"), fla, ref):
        assert g_ref.norm() > 0, name
        assert rel_err(g_fla, g_ref) < 3e-2, (name, rel_err(g_fla, g_ref))


@pytest.mark.gpu
@needs_fla
def test_trained_layers_learn_from_far_context_on_gpu():
    """The student as training runs it (compiled layers, activation checkpointing, bf16 autocast, fla)
    against the same student on the CPU reference: the gradient of a loss on the last tokens with
    respect to the first tokens' embeddings, which only the recurrent state carries that far."""
    from radlads.convert.steps import prepare_student

    teacher = make_teacher("qwen2", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    T, tail = 512, 32
    ids = torch.randint(0, teacher.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    far = []
    for device in ("cuda", "cpu"):
        student = transfer(teacher, arch="rad-rwkv7").to(device).train()
        if device == "cuda":
            prepare_student(student, activation_checkpointing=True, compile=True)
        embeds = student.get_input_embeddings()(ids.to(device)).detach().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = student(inputs_embeds=embeds).logits[:, -tail:]
        logits.float().logsumexp(-1).sum().backward()
        far.append(embeds.grad[:, : T - 128].float().cpu())
    assert far[1].norm() > 0
    assert rel_err(*far) < 5e-2, rel_err(*far)
