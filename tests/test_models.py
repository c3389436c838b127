"""Student models: decoding equivalence, padding, generate(), save/load, init."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from radlads.convert.transfer import transfer
from radlads.models import RadladsCache, RadladsForCausalLM
from tiny_models import make_teacher

VARIANTS = {
    "rwkv7": dict(arch="rad-rwkv7"),
    "rwkv6": dict(arch="rad-rwkv6"),
    "rwkv7-hybrid": dict(arch="rad-rwkv7", softmax_layers=[-1]),
    "rwkv6-hybrid-first": dict(arch="rad-rwkv6", softmax_layers=[0]),
    # Windows far shorter than the tests' sequences, so that the kept keys are pruned as they decode.
    "rwkv7-hybrid-window": dict(arch="rad-rwkv7", softmax_layers=[0, -1], softmax_window=6, softmax_sinks=2),
    "rwkv7-groupnorm-lowrank-gate": dict(arch="rad-rwkv7", groupnorm=True, gate_rank=32),
}


def perturbed_student(family="qwen2", **options) -> RadladsForCausalLM:
    """A student whose new parameters are random, so every term of the equations is exercised."""
    student = transfer(make_teacher(family), **options).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if any(key in name for key in ("lora", "gate", "k_k", "k_a", "a0", "v0")):
                p.add_(torch.randn_like(p) * 0.3)
    return student


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_plus_decoding_equals_full_forward(variant):
    student = perturbed_student(**VARIANTS[variant])
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = student(ids).logits
        out = student(ids[:, :11], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(11, 24):
            out = student(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    assert isinstance(cache, RadladsCache) and cache.seen_tokens == 24
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_loss_is_the_shifted_cross_entropy_and_honours_num_items_in_batch():
    """HF's Trainer passes num_items_in_batch to a forward that takes **kwargs and then leaves the
    loss undivided by its gradient accumulation steps: a mean loss would be that many times too large."""
    student = perturbed_student()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = student(ids, labels=labels)
        summed = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        torch.testing.assert_close(out.loss, summed / (labels[:, 1:] != -100).sum())
        torch.testing.assert_close(student(ids, labels=labels, num_items_in_batch=40).loss, summed / 40)


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv7-hybrid"])
def test_hidden_states_are_the_embeddings_and_layer_outputs_the_last_normed_as_transformers_has_them(
    variant,
):
    student = perturbed_student(**VARIANTS[variant])
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = student(ids, output_hidden_states=True)
        plain = student(ids)
        hidden = student.model.embed_tokens(ids)
        position_embeddings = student.model.rotary_emb(hidden, torch.arange(9)[None])
        layer_outputs, v_first = [], None
        for layer in student.model.layers:
            hidden, v_first, _ = layer(hidden, position_embeddings, None, v_first)
            layer_outputs.append(hidden)
    assert len(out.hidden_states) == student.config.num_hidden_layers + 1
    for got, want in zip(out.hidden_states[1:-1], layer_outputs[:-1]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.hidden_states[-1], student.model.norm(layer_outputs[-1]))
    torch.testing.assert_close(out.logits, plain.logits)
    torch.testing.assert_close(student.lm_head(out.hidden_states[-1]), plain.logits)


def test_return_dict_false_gives_a_tuple_as_transformers_models_do():
    student = perturbed_student()
    ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student(ids, labels=ids, use_cache=True)
        got = student(ids, labels=ids, use_cache=True, return_dict=False)
    assert isinstance(got, tuple) and len(got) == 3
    loss, logits, cache = got
    torch.testing.assert_close(loss, want.loss)
    torch.testing.assert_close(logits, want.logits)
    assert isinstance(cache, RadladsCache) and cache.seen_tokens == 6


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv7-hybrid"])
def test_generate_passes_logits_to_keep_and_output_hidden_states_to_forward(variant):
    """generate() asks for the prompt's last logits only (logits_to_keep=1), and for each step's
    hidden states where output_hidden_states: a student computed a prompt's full [B, T, V] logits
    and returned None for every step's hidden states."""
    student = perturbed_student(**VARIANTS[variant])
    prompt = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(2))
    shapes = []
    student.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    out = student.generate(
        prompt,
        max_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
        output_hidden_states=True,
        output_logits=True,
    )
    assert shapes == [(1, 1, 320)] * 3
    assert [len(h) for h in out.hidden_states] == [student.config.num_hidden_layers + 1] * 3
    assert [h[-1].shape[1] for h in out.hidden_states] == [30, 1, 1]
    for step, hidden in enumerate(out.hidden_states):
        torch.testing.assert_close(student.lm_head(hidden[-1][:, -1]), out.logits[step])
    assert torch.equal(out.sequences, student.generate(prompt, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6", "rwkv7-hybrid", "rwkv7-hybrid-window"])
def test_generate_matches_greedy_from_full_forward(variant):
    student = perturbed_student(**VARIANTS[variant])
    prompt = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(2))
    generated = student.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, student(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, ids)


def test_generate_from_embeddings_continues_past_the_first_token():
    """generate(inputs_embeds=...) holds only the generated tokens in input_ids: the prompt counts
    in the cache's length but not in them (soft prompts, multimodal front ends)."""
    student = perturbed_student(**VARIANTS["rwkv7"])
    prompt = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(2))
    from_ids = student.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    embeds = student.get_input_embeddings()(prompt)
    from_embeds = student.generate(inputs_embeds=embeds, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 7:])


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv7-hybrid", "rwkv7-hybrid-window"])
def test_generate_continues_from_a_returned_cache(variant):
    """A conversation's next turn: generate() from the cache an earlier generate() returned gives
    what one longer call gives."""
    student = perturbed_student(**VARIANTS[variant])
    prompt = torch.randint(1, 320, (2, 7), generator=torch.Generator().manual_seed(2))
    first = student.generate(
        prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True
    )
    cache = first.past_key_values if getattr(first, "past_key_values", None) is not None else first.cache
    assert isinstance(cache, RadladsCache)
    continued = student.generate(
        first.sequences, cache=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False
    )
    at_once = student.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(continued, at_once)


def test_beam_search_without_a_cache_equals_with_one():
    student = perturbed_student(**VARIANTS["rwkv7"])
    prompt = torch.randint(1, 320, (1, 7), generator=torch.Generator().manual_seed(2))
    runs = [
        student.generate(prompt, max_new_tokens=4, num_beams=2, do_sample=False, use_cache=cached)
        for cached in (True, False)
    ]
    assert torch.equal(*runs)


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv7-hybrid"])
def test_a_forward_returns_its_cache_outside_training_as_transformers_models_do(variant):
    """model(ids) hands back the state (a LlamaForCausalLM hands back its KV cache), and the next
    token fed with it scores as in one longer forward; not while training, nor when the config
    or the call says no."""
    student = perturbed_student(**VARIANTS[variant])
    ids = torch.randint(1, 320, (2, 9), generator=torch.Generator().manual_seed(4))
    out = student(ids[:, :8])
    assert isinstance(out.cache, RadladsCache) and out.cache.seen_tokens == 8
    step = student(ids[:, 8:], cache=out.cache).logits[:, -1]
    torch.testing.assert_close(step, student(ids, use_cache=False).logits[:, -1], rtol=1e-4, atol=1e-4)
    assert student(ids, use_cache=False).cache is None
    student.config.use_cache = False
    assert student(ids).cache is None
    student.config.use_cache = True
    student.train()
    assert student(ids).cache is None


def test_recurrent_state_does_not_grow_with_context():
    student = perturbed_student(arch="rad-rwkv7")
    cache = student(torch.zeros(1, 8, dtype=torch.long), use_cache=True).cache
    size = cache.nbytes()
    with torch.no_grad():
        for _ in range(20):
            cache = student(torch.ones(1, 1, dtype=torch.long), cache=cache, use_cache=True).cache
    assert cache.nbytes() == size


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6-hybrid-first", "rwkv7-hybrid-window"])
def test_left_padding_gives_the_unpadded_result(variant):
    student = perturbed_student(**VARIANTS[variant])
    short = torch.randint(1, 320, (1, 9), generator=torch.Generator().manual_seed(3))
    long = torch.randint(1, 320, (1, 13), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    alone = student.generate(short, max_new_tokens=5, do_sample=False)
    batched = student.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(batched[0, 4:], alone[0])


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6", "rwkv7-hybrid", "rwkv7-hybrid-window"])
def test_save_pretrained_round_trip(tmp_path, variant):
    student = perturbed_student(**VARIANTS[variant])
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RadladsForCausalLM
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


def test_untied_head_survives_round_trip(tmp_path):
    student = perturbed_student(arch="rad-rwkv7")
    assert student.lm_head.weight is student.model.embed_tokens.weight  # the Qwen2 teacher ties them
    student.untie_embeddings()
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, student.lm_head.weight)


def test_resized_embeddings_survive_round_trip(tmp_path):
    """Added tokens (a pad or chat token) resize the embedding: the saved student loads at the new
    size, its logits unchanged."""
    student = perturbed_student(arch="rad-rwkv7")
    student.resize_token_embeddings(384)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.embed_tokens.weight.shape[0] == loaded.lm_head.weight.shape[0] == 384
    ids = torch.tensor([[1, 2, 3, 383]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student.eval()(ids).logits)


def test_rwkv7_low_rank_gate_is_sigmoid_between_its_factors(monkeypatch):
    """SPEC: the low-rank option is g = sigmoid(x G1) G2 (not sigmoid(x G1 G2)); it starts at
    about 1/2, as the full-rank gate does."""
    student = perturbed_student(**VARIANTS["rwkv7-groupnorm-lowrank-gate"])
    mixer = student.model.layers[1].self_attn
    mixer_type, real_output = type(mixer), type(mixer).output
    seen = {}

    def output(self, y, gate):
        seen.setdefault(self.layer_idx, gate)
        return real_output(self, y, gate)

    monkeypatch.setattr(mixer_type, "output", output)

    def keep_input(module, args):
        seen.setdefault("x", args[0])

    mixer.register_forward_pre_hook(keep_input)
    with torch.no_grad():
        student(torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(5)))
        expected = mixer.gate.up(torch.sigmoid(mixer.gate.down(seen["x"])))
    torch.testing.assert_close(seen[1], expected, rtol=1e-5, atol=1e-6)
    fresh = (
        transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7", gate_rank=32)
        .model.layers[1]
        .self_attn
    )
    with torch.no_grad():
        start = fresh.gate(torch.randn(4, 7, fresh.gate.down.in_features))
    assert abs(start.mean().item() - 0.5) < 0.05 and start.std().item() < 0.1


def test_gate_rank_auto_is_the_specs_gate_lora_rank(tmp_path):
    from radlads.models.configuration import gate_lora_rank

    assert gate_lora_rank("rad-rwkv7", 576) == 128  # round_up_32(0.6 * 576^0.8 = 97.0)
    assert gate_lora_rank("rad-rwkv7", 3584) == 448 and gate_lora_rank("rad-rwkv6", 3584) == 128
    student = transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7", gate_rank="auto")
    rank = gate_lora_rank("rad-rwkv7", student.config.hidden_size)
    assert student.config.gate_rank == rank
    assert student.model.layers[1].self_attn.gate.down.out_features == rank
    student.save_pretrained(tmp_path)
    assert RadladsForCausalLM.from_pretrained(tmp_path).config.gate_rank == rank
    for bad in ("full", 0, 2.5):
        with pytest.raises(ValueError, match="gate_rank must be a positive int"):
            transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7", gate_rank=bad)


def test_new_parameters_start_at_their_documented_values():
    student = transfer(make_teacher("llama"), arch="rad-rwkv7")
    mixer = student.model.layers[1].self_attn
    assert torch.all(mixer.gate.weight == 0)  # gate = 1/2 everywhere
    assert torch.all(mixer.w_lora.down.weight == 0) and mixer.w_lora.up.weight.abs().max() > 0
    assert torch.allclose(mixer.k_k, torch.full_like(mixer.k_k, 0.85))
    assert torch.allclose(mixer.v0, torch.ones_like(mixer.v0))
    assert not hasattr(student.model.layers[0].self_attn, "v0")  # layer 0 provides v_first
    assert mixer.w0[0] < mixer.w0[-1]  # the decay-speed schedule rises across channels


@pytest.mark.parametrize("arch", ["rad-rwkv7", "rad-rwkv6"])
def test_decay_init_per_head_gives_every_head_the_whole_schedule(arch, tmp_path):
    """Across heads (RWKV-7's schedule, the default) the first head starts slowest and the last
    fastest; per head, every head runs from slowest to fastest, the same range overall, and the
    choice survives save_pretrained."""
    teacher = make_teacher("qwen2")  # GQA: query heads share KV heads
    w0 = {}
    for init in ("across-heads", "per-head"):
        student = transfer(teacher, arch=arch, decay_init=init)
        mixer = student.model.layers[1].self_attn
        w0[init] = mixer.w0.detach().view(mixer.num_heads, -1)
    across, per_head = w0["across-heads"], w0["per-head"]
    assert across[0].max() < across[-1].min()  # head 0 entirely slower than the last head
    assert torch.equal(per_head, per_head[:1].expand_as(per_head))  # every head alike
    assert per_head[0, 0] == across.min() and per_head[0, -1] == across.max()
    student.save_pretrained(tmp_path)
    assert RadladsForCausalLM.from_pretrained(tmp_path).config.decay_init == "per-head"
    with pytest.raises(ValueError, match="decay_init 'fast'"):
        transfer(teacher, arch=arch, decay_init="fast")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_train_like_eager_ones(checkpointing):
    """compile_layers (the training path on CUDA) breaks each graph at the recurrence kernel and
    fuses the rest: the same loss and gradients as eager, in the whole model and in a mixer alone,
    with and without activation checkpointing."""
    import copy

    from radlads.convert.alignment import student_attention_outputs, teacher_attention_io
    from radlads.convert.steps import prepare_student

    teacher = make_teacher("qwen2", num_hidden_layers=2)
    eager = transfer(teacher, "rad-rwkv7").train()
    compiled = copy.deepcopy(eager)
    prepare_student(eager, activation_checkpointing=checkpointing, compile=False)
    prepare_student(compiled, activation_checkpointing=checkpointing, compile=False)
    compiled.compile_layers()  # prepare_student compiles on CUDA only
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24))
    io = teacher_attention_io(teacher, ids)
    for model in (eager, compiled):
        model(input_ids=ids).logits.square().mean().backward()  # steps 2-3: the decoder layers
        sum(y.square().mean() for y in student_attention_outputs(model, io)).backward()  # step 1
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("keep,checkpointing", [(False, False), (True, False), (False, True)])
def test_prepare_student_tells_the_rwkv7_kernels_whether_to_recompute(keep, checkpointing, monkeypatch):
    """keep_kernel_intermediates, and activation checkpointing (where keeping costs one layer's
    worth), reach a fla-like kernel as recompute=False; the PyTorch references never see it."""
    import radlads.kernels as kernels
    from radlads.convert.steps import prepare_student

    seen = []

    def fla_like(*args, recompute=True, log_w_min=None, scale=1.0):
        seen.append(recompute)
        return kernels.recurrent_chunked(*args, scale=scale)[0]

    student = transfer(make_teacher("qwen2", num_hidden_layers=2), "rad-rwkv7").train()
    prepare_student(student, checkpointing, compile=False, keep_kernel_intermediates=keep)
    ids = torch.randint(0, student.config.vocab_size, (2, 16))
    student(input_ids=ids).logits.sum().backward()  # the references: no unexpected argument
    monkeypatch.setattr(kernels, "_fla_runs", lambda backend, on_cuda: True)  # as on a GPU with fla
    monkeypatch.setattr(kernels.fla_ops, "rwkv7_chunk", fla_like)
    student(input_ids=ids).logits.sum().backward()
    assert seen and set(seen) == {not (keep or checkpointing)}


def test_compiled_layers_stay_compiled_through_the_three_steps():
    """Each step builds a new student and compiles it (prepare_student): without a fresh Dynamo
    cache per step, steps 1-3's variants (grad / no grad, inputs needing grad, other shapes)
    passed the recompile limit by step 3, after which Dynamo silently runs eagerly."""
    from radlads.convert.alignment import student_attention_outputs, teacher_attention_io
    from radlads.convert.steps import prepare_student

    teacher = make_teacher("qwen2", num_hidden_layers=2)
    vocab = teacher.config.vocab_size
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for step, (batch, length) in ((1, (2, 16)), (2, (2, 16)), (3, (1, 40))):
            student = transfer(teacher, "rad-rwkv7").train()
            prepare_student(student, activation_checkpointing=False, compile=True)
            ids = torch.randint(0, vocab, (batch, length))
            with torch.no_grad():  # held-out loss before and after
                student(input_ids=ids)
            if step == 1:
                io = teacher_attention_io(teacher, ids)
                sum(y.sum() for y in student_attention_outputs(student, io)).backward()
                with torch.no_grad():
                    student_attention_outputs(student, io)
            else:
                student(input_ids=ids).logits.sum().backward()


def test_compiled_teacher_matches_eager_keeps_step_1_hooks_and_compiles_once_for_all_layers():
    """prepare_teacher compiles each layer's parts once for all layers (10 layers: past Dynamo's
    recompile limit of 8 if it specialised per layer), step 1's hooks still see each attention's
    input and output with new hooks every update, and compile=False restores the eager teacher.
    Without a KV cache, as training runs it: with one, attention specialises on its layer index."""
    from radlads.convert.alignment import teacher_attention_io
    from radlads.convert.teacher import TEACHER_LAYER_PARTS, prepare_teacher

    torch._dynamo.reset()
    teacher = make_teacher("qwen2", num_hidden_layers=10).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    eager_io = teacher_attention_io(teacher, ids)
    eager_out = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
    prepare_teacher(teacher, compile=True)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for _ in range(3):
            io = teacher_attention_io(teacher, ids)
        out = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
    assert len(io.inputs) == len(io.outputs) == 10
    for got, want in zip(io.inputs + io.outputs, eager_io.inputs + eager_io.outputs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-4)
    prepare_teacher(teacher, compile=False)
    layer = teacher.model.layers[0]
    assert all("forward" not in vars(getattr(layer, part)) for part in TEACHER_LAYER_PARTS)


def test_layers_under_autocast_cast_each_norm_output_once_not_per_matmul():
    """Each norm's output feeds several matmuls (q, k, v, the LoRAs, the gate; the MLP's gate and
    up). Left to autocast, each matmul casts its own copy and, in backward, its input gradient
    back: 26 [B, T, C] casts a layer here. Cast once, half as many."""
    from torch.profiler import ProfilerActivity, profile

    teacher = make_teacher("qwen2", num_hidden_layers=2)
    student = transfer(teacher, "rad-rwkv7").train()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    hidden = teacher.config.hidden_size
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = student.model(input_ids=ids).last_hidden_state
        out.float().sum().backward()
    casts = [
        e
        for e in prof.events()
        if e.name == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == [2, 12, hidden]
    ]
    assert len(casts) <= 16 * len(student.model.layers), len(casts)


@pytest.mark.parametrize("arch", ["rad-rwkv7", "rad-rwkv6"])
def test_compiled_mixer_casts_kernel_inputs_in_the_graph_that_computes_them(arch):
    """The recurrence is a graph break. Dynamo compiles a function entered before a break as a
    graph of its own, so casts made inside the recurrence's call ran as separate cast kernels
    (one read and one write of each input more); made by the mixer itself, they fuse into the
    kernels that compute the inputs."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    teacher = make_teacher("qwen2", num_hidden_layers=2)
    student = transfer(teacher, arch).train()
    mixer = torch.compile(student.model.layers[1].self_attn, backend=record)
    x = torch.randn(2, 16, teacher.config.hidden_size)
    position_embeddings = student.model.rotary_emb(x, torch.arange(16)[None])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(x.bfloat16(), position_embeddings, v_first=torch.randn(2, 16, 4, 16).bfloat16())

    def changes_dtype(node) -> bool:
        return node.meta["example_value"].dtype != node.args[0].meta["example_value"].dtype

    for g in graphs:
        calls = [n for n in g.graph.nodes if n.op in ("call_function", "call_method")]
        casts = [n for n in calls if n.target == "to" and changes_dtype(n)]
        assert not casts or len(casts) < len(calls), f"a graph of casts only: {g.graph}"
    assert len(graphs) >= 2  # before and after the recurrence's graph break


@pytest.mark.parametrize("variant", ["rwkv7", "rwkv6", "rwkv7-groupnorm-lowrank-gate"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])  # q/k/v with and without biases
def test_training_reads_the_mixer_input_in_one_matmul_to_the_same_output_and_gradients(
    variant, family, monkeypatch
):
    """Where its input's gradient is wanted, a mixer's maps of the input run as one matmul
    (fused_linears): the same output as without gradients (each map alone, as generation and step
    1 run them), and the same gradients as the maps run one by one."""
    import radlads.models.common as common

    student = perturbed_student(family, **VARIANTS[variant])
    mixer = student.model.layers[1].self_attn
    x = torch.randn(2, 7, student.config.hidden_size, requires_grad=True)
    position_embeddings = student.model.rotary_emb(x, torch.arange(7)[None])
    v_first = torch.randn(2, 7, mixer.num_heads, mixer.head_dim)
    alone = []
    mixer.q_proj.register_forward_hook(lambda *_: alone.append(True))
    with torch.no_grad():
        expected = mixer(x, position_embeddings, v_first=v_first)[0]
    assert alone  # without gradients the q projection ran as its own module
    alone.clear()
    mixer(x.detach(), position_embeddings, v_first=v_first)[0].sum().backward()
    assert alone  # and without x's gradient (step 1)

    def run():
        alone.clear()
        x.grad = None
        student.zero_grad()
        out = mixer(x, position_embeddings, v_first=v_first)[0]
        out.pow(2).sum().backward()
        return out, x.grad, {n: p.grad for n, p in mixer.named_parameters() if p.grad is not None}

    fused, fused_x_grad, fused_grads = run()
    assert not alone  # it was part of the one matmul
    monkeypatch.setattr(common, "fused_linears", lambda x, maps: [m(x) for m in maps])
    one_by_one, x_grad, grads = run()
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(fused, one_by_one)
    # x's gradient is one matmul's sum instead of several: fp32 rounding in another order
    torch.testing.assert_close(fused_x_grad, x_grad, rtol=1e-4, atol=1e-4)
    assert fused_grads.keys() == grads.keys() and "q_proj.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
