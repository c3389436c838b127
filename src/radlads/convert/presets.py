"""Step settings by teacher size, and for small teachers the student's shape: the recipes
`radlads convert --preset` applies.

Per teacher size: sequences per optimizer update (each step's micro-batch is then chosen to fit
the GPU, convert.batching, unless a batch size is given) and, for small teachers, the recipe
measured best on SmolLM2-135M (docs/results/smollm2-135m.md): step 2 distils at 2048 tokens,
where the student learns to use long context (at 512, with the same tokens per update, it ended
0.24 nats further behind its teacher past 1,024 tokens), with a cosine LR from 1e-4, and the parameters
step 0 creates at 10x that LR (at 150M tokens: teacher/student perplexity 0.852 -> 0.905, gap past
1,024 tokens 0.239 -> 0.170 nats, against the same run at one LR); step 3 runs (10M tokens at the
trained context, as in the best run; 8M of it cut a 48M-token run's long-context gap by a fifth).

A small teacher's student keeps the teacher's two induction layers as softmax attention, each
over a window of step 3's sequence length (SMALL_HYBRID): on SmolLM2-135M that hybrid beat its
teacher (perplexity ratio 1.074, every passkey the teacher found), where the pure student reached
0.905 and retrieved none. Training never exceeds the window, so within it the layers attend over
the whole context; past it, their KV cache stays the window's size, so decoding memory stays
bounded at any length, as a pure student's does.
"""

from __future__ import annotations

PRESETS: dict[str, dict[int, dict]] = {
    "cpu-smoke": {
        1: dict(batch_size=2, seq_len=128),
        2: dict(batch_size=2, seq_len=128),
        3: dict(seq_len=512, batch_size=1),
    },
    "small": {
        1: dict(global_batch_size=128),
        2: dict(global_batch_size=32, seq_len=2048, lr=1e-4, lr_final=1e-5, new_lr_scale=10.0),
        3: dict(tokens=10_000_000, global_batch_size=8),
    },
    "medium": {1: dict(global_batch_size=32), 2: dict(global_batch_size=32), 3: dict(global_batch_size=4)},
    "large": {1: dict(global_batch_size=32), 2: dict(global_batch_size=32), 3: dict(global_batch_size=4)},
}
PRESET_NAMES = ("auto", *PRESETS)
# The softmax layers a small teacher's hybrid keeps (layer_choice.auto_count), where they are at most
# an eighth of the teacher's layers; below 16 layers the student stays pure.
SMALL_HYBRID = "auto:2"


def preset_steps(name: str, teacher_config: dict) -> dict[int, dict]:
    """StepConfig fields per step for preset `name` ("auto": by the teacher's size), given the
    teacher's config.json as a dict; steps 2 and 3 stay within the teacher's trained context."""
    name = resolve_preset(name, teacher_config)
    steps = {k: dict(v) for k, v in PRESETS[name].items()}
    if name != "cpu-smoke":
        trained = teacher_config.get("max_position_embeddings")
        steps[3].setdefault("seq_len", step3_seq_len(trained))
        if trained and steps[2].get("seq_len", 0) > trained:  # distil within what the teacher saw
            steps[2]["seq_len"] = trained
    return steps


def preset_student(name: str, teacher_config: dict) -> dict:
    """RadladsConfig options of preset `name` for this teacher (config.json as a dict): for small
    teachers of 16 layers or more, a hybrid of SMALL_HYBRID's layers windowed at step 3's length."""
    if resolve_preset(name, teacher_config) != "small" or teacher_config["num_hidden_layers"] < 16:
        return {}
    window = step3_seq_len(teacher_config.get("max_position_embeddings"))
    return {"softmax_layers": SMALL_HYBRID, "softmax_window": window}


def resolve_preset(name: str, teacher_config: dict) -> str:
    """The preset `name` stands for with this teacher: "auto" by its size; an unknown name is refused."""
    if name == "auto":
        name = size_class(teacher_config)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return name


def step3_seq_len(trained_context: int | None) -> int:
    """Step 3's sequence length: the teacher's trained context, up to the paper's 16,384."""
    return min(16384, trained_context or 16384)


def size_class(teacher_config: dict) -> str:
    """small (< 1B parameters), medium (< 10B) or large, from the config's shapes alone."""
    cfg = teacher_config
    layer = 4 * cfg["hidden_size"] ** 2 + 3 * cfg["hidden_size"] * cfg["intermediate_size"]
    params = cfg["num_hidden_layers"] * layer + cfg["vocab_size"] * cfg["hidden_size"]
    return "small" if params < 1e9 else "medium" if params < 10e9 else "large"
