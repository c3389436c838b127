"""`convert`: step 0 -> 1 -> 2 -> 3 into one output folder, resumable, each step also runnable alone.

OUT/ ends as a Hugging Face model folder (config.json, model.safetensors, tokenizer, radlads.json)
beside the run's own files: checkpoints/step{k}/, metrics.jsonl, tensorboard/, data/, config.yaml.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, GenerationConfig

from ..data import PackedLoader, ShardIndex, check_tokenizer, check_vocab_size, prepare_shards
from ..files import claim_folder, copy_atomic, sha256_of, write_json_atomic, write_text_atomic
from ..models import RadladsForCausalLM
from ..teachers import load_teacher_tokenizer, resolve_teacher
from ..train.checkpoint import (
    find_checkpoint,
    is_resumable,
    load_model_state,
    read_trainer_state,
    save_model,
    tidy,
)
from ..train.config import ConvertConfig, StepConfig
from ..train.distributed import Distributed
from ..train.metrics import MetricsLog
from ..train.trainer import Trainer
from .alignment import layer_cosines
from .batching import size_step
from .layer_choice import auto_count, copy_heads, strongest
from .steps import AttentionAlignment, ContextExtension, Distillation, prepare_student
from .teacher import prepare_teacher
from .transfer import load_teacher, transfer

log = logging.getLogger("radlads")
STEPS = (0, 1, 2, 3)
SUMMARY_FILE = "radlads.json"  # written last by an export


class StepOrderError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Conversion:
    """One conversion run in one output folder."""

    def __init__(self, cfg: ConvertConfig, progress: bool = True):
        if not cfg.out:
            raise ValueError("set an output folder (--out)")
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out)
        # under torchrun: one process per device, data-parallel with FSDP2; otherwise one process
        self.dist = Distributed.init(resolve_device(cfg.device))
        self.device = self.dist.device
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.metrics = MetricsLog(self.out)
        self._teacher = self._tokenizer = None

    # --- inputs, loaded once and only when a step needs them ---

    @functools.cached_property
    def teacher_dir(self) -> Path:
        return resolve_teacher(self.cfg.teacher, random_weights=self.cfg.random_teacher_weights)

    @property
    def teacher(self):
        if self._teacher is None:
            self._teacher = load_teacher(
                self.teacher_dir, self.dtype, self.device, self.cfg.random_teacher_weights, self.cfg.seed
            )
        return self._teacher

    @functools.cached_property
    def softmax_layers(self) -> list[int]:
        """The layers the student keeps as softmax attention: as given; for "auto:N", those the
        step-0 student kept, or else the N with the teacher's strongest induction heads."""
        spec = self.cfg.student.get("softmax_layers", ())
        n = auto_count(spec)
        if n is None:
            return list(spec)
        done = find_checkpoint(self.checkpoint(0))
        if done is not None:
            return json.loads((done / "config.json").read_text())["softmax_layers"]
        induction = copy_heads(self.teacher, self.teacher.config.vocab_size).induction
        chosen = strongest(induction, n)
        log.info(
            "softmax layers auto:%d -> %s (strongest induction head by layer: %s)",
            n,
            ",".join(map(str, chosen)),
            " ".join(f"{r:.2f}" for r in induction),
        )
        return chosen

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_teacher_tokenizer(self.teacher_dir)
        return self._tokenizer

    @functools.cache  # noqa: B019  (one Conversion per run; the cache dies with it)
    def shards(self) -> Path:
        """The data as token shards of the teacher's tokenizer: prepared once under OUT/data."""
        data = Path(self.cfg.data)
        if (data / "index.json").is_file():
            index = ShardIndex.load(data)
            check_vocab_size(index, AutoConfig.from_pretrained(self.teacher_dir).vocab_size)
            check_tokenizer(index, self.tokenizer)
            return data
        prepare_shards(
            data,
            self.tokenizer,
            self.out / "data",
            held_out_fraction=self.cfg.held_out_fraction,
            seed=self.cfg.seed,
            progress=self.progress,
        )
        return self.out / "data"

    # --- checkpoints ---

    def checkpoint(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step{step}"

    def completed(self, step: int) -> bool:
        found = find_checkpoint(self.checkpoint(step))
        return found is not None and read_trainer_state(found).get("complete", False)

    def latest_complete_before(self, step: int) -> int | None:
        return next((k for k in reversed(STEPS[:step]) if self.completed(k)), None)

    def load_student(self, path: Path) -> RadladsForCausalLM:
        return RadladsForCausalLM.from_pretrained(find_checkpoint(path), dtype=torch.float32).to(self.device)

    # --- the steps ---

    def run(self, steps: tuple[int, ...] = STEPS) -> Path:
        if not self.dist.is_main:  # rank 0 holds the folder for them all
            return self._run(steps)
        self._make_out()
        with claim_folder(self.out, "radlads run"):
            return self._run(steps)

    def _run(self, steps: tuple[int, ...]) -> Path:
        if self.dist.is_main:
            self._write_config()
            for step in STEPS:
                tidy(self.checkpoint(step))
        if self.dist.enabled:  # rank 0 tokenizes; the others wait and read its shards
            if self.dist.is_main:
                self.shards()
            self.dist.barrier()
            self.shards()
        for step in steps:
            if self.completed(step):
                log.info("step %d already complete in %s; skipping", step, self.checkpoint(step))
            elif step == 0:
                if self.dist.is_main:
                    self.step0()
                self.dist.barrier()
            elif self.cfg.steps()[step].tokens > 0:
                self.train(step)
        if self.dist.is_main:
            self.export()
        self.dist.barrier()
        return self.out

    def step0(self) -> None:
        torch.manual_seed(self.cfg.seed)  # the new parameters' random init
        options = {**self.cfg.student, "softmax_layers": self.softmax_layers}
        student = transfer(self.teacher, self.cfg.arch, **options)
        ids = next(
            iter(self._heldout_batches(seq_len=min(512, self.cfg.step1.seq_len), batch_size=2, n=1)), None
        )
        cosines = layer_cosines(self.teacher, student, ids.to(self.device)) if ids is not None else []
        save_model(self.checkpoint(0), student, {"step": 0, "complete": True, "layer_cosines": cosines})

    def train(self, step: int) -> None:
        if step == 3:  # context extension has no teacher: its weights would only take activation memory
            self._teacher = None
            gc.collect()  # an FSDP-sharded module and its FSDP state refer to each other: a cycle
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        # A mid-step checkpoint holds sharded state, not a model folder: build the student from the
        # previous step and let the trainer load that state over it.
        student = self.load_student(self._previous(step))
        # Compiled layers under FSDP2 are not yet validated on GPUs: sharded runs use eager models.
        compile_layers = self.cfg.compile and not self.dist.enabled and self.device.type == "cuda"
        prepare_student(
            student, self.cfg.activation_checkpointing, compile_layers, self.cfg.keep_kernel_intermediates
        )
        if step < 3:
            prepare_teacher(self.teacher, compile_layers, whole_layers=step == 2)
        objective = {
            1: lambda: AttentionAlignment(self.teacher, self.cfg.compile),
            2: lambda: Distillation(self.teacher, self.cfg.kl_chunk_tokens, self.cfg.compile),
            3: lambda: ContextExtension(self.cfg.kl_chunk_tokens, self.cfg.compile),
        }[step]()
        if step < 3:  # the trainer shards the student
            self.dist.shard_teacher(self.teacher)
        cfg = self.sized(step)
        shards = self.shards()
        rank = dict(rank=self.dist.rank, world_size=self.dist.world_size)
        per_update = cfg.batch_size * cfg.grad_accum  # this process's sequences of each update
        loader = PackedLoader(
            shards,
            cfg.seq_len,
            per_update,
            seed=self.cfg.seed + step,
            repeat_fraction=cfg.repeat_fraction,
            **rank,
        )
        heldout = list(self._heldout_batches(cfg.seq_len, cfg.batch_size, cfg.heldout_batches, **rank))
        trainer = Trainer(
            objective,
            student,
            cfg,
            loader,
            heldout,
            self.checkpoint(step),
            self.metrics,
            self.device,
            self.progress,
            self.dist,
            compiled=compile_layers,
        )
        result = trainer.run()
        if not self.dist.is_main:
            return
        heldout = (
            "no held-out text"
            if result.heldout_start is None
            else f"held-out {result.heldout_start:.4g} -> {result.heldout_end:.4g}"
        )
        log.info(
            "step %d done in %.1f min: loss %.4g -> %.4g (%s)",
            step,
            result.wall_s / 60,
            result.first_loss,
            result.last_loss,
            heldout,
        )

    def sized(self, step: int) -> StepConfig:
        """The step's config with its micro-batch chosen for the device where none was given."""
        options = dict(
            activation_checkpointing=self.cfg.activation_checkpointing,
            softmax_layers=tuple(self.softmax_layers),
            keep_kernel_intermediates=self.cfg.keep_kernel_intermediates,
            tilelang=self.device.type == "cuda" and importlib.util.find_spec("tilelang") is not None,
        )
        step_cfg, world = self.cfg.steps()[step], self.dist.world_size
        return size_step(step_cfg, step, self.device, world, self.teacher_dir, self.cfg.arch, **options)[0]

    def _previous(self, step: int) -> Path:
        previous = self.latest_complete_before(step)
        if previous is None:
            raise StepOrderError(
                f"step {step} needs a finished earlier step in {self.out}; run step 0 first "
                f"(radlads step0 --out {self.out} ...) or the whole `radlads convert`"
            )
        return self.checkpoint(previous)

    def _heldout_batches(self, seq_len: int, batch_size: int, n: int, rank: int = 0, world_size: int = 1):
        try:
            loader = PackedLoader(
                self.shards(), seq_len, batch_size, split="heldout", rank=rank, world_size=world_size
            )
        except ValueError as err:  # too little held-out text for even one batch: say so, carry on
            log.warning("no held-out evaluation: %s", err)
            return
        for i, batch in enumerate(loader):
            if i >= n:
                return
            yield batch

    # --- outputs ---

    def _make_out(self) -> None:
        """Make --out, or check that an existing one is this run's to write: the export replaces a
        folder's weights, so neither the teacher's folder nor a model that no run wrote."""
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file, not a folder; name a new or existing folder")
        teacher = Path(self.cfg.teacher)
        if teacher.is_dir() and teacher.resolve() == self.out.resolve():
            raise ValueError(f"--out {self.out} is the teacher's folder: name another folder for the student")
        data = Path(self.cfg.data) if self.cfg.data else None
        if data and data.is_dir() and not (data / "index.json").is_file():  # a text folder
            if self.out.resolve().is_relative_to(data.resolve()):
                raise ValueError(
                    f"--out {self.out} lies inside the text folder --data {data}: its logs would be read "
                    "as corpus next time; name a folder outside it"
                )
        if not (self.out / "config.yaml").is_file() and any(self.out.glob("model*.safetensors")):
            raise ValueError(
                f"--out {self.out} holds model weights that no radlads run wrote there (it has no "
                "config.yaml): the student would replace them; name a new folder"
            )
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.out).close()  # unnamed where the OS allows: nothing left behind
        except OSError as err:
            raise ValueError(
                f"cannot write to --out {self.out} ({err.strerror or err}); name a folder you can write to"
            ) from None

    def _write_config(self) -> None:
        """Record the run's config; refuse to mix another teacher or student into an existing run."""
        path = self.out / "config.yaml"
        if path.is_file():
            old = yaml.safe_load(path.read_text()) or {}
            new = yaml.safe_load(yaml.safe_dump(self.cfg.to_dict()))  # as read back: tuples are lists
            changed = [
                k for k in ("teacher", "arch", "student") if not same_setting(k, old.get(k), new.get(k))
            ]
            if changed:
                # A run begun when the default student was pure resumes with --softmax-layers none.
                again = " (--softmax-layers none for a pure student)" if "student" in changed else ""
                raise ValueError(
                    f"{self.out} holds a run with another {', '.join(changed)} "
                    f"({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); give the options it was "
                    f"made with{again}, use a new --out, or delete it"
                )
            if old != new:  # other settings this time (budgets, batch): keep the record of the last run
                n = 1 + sum(1 for _ in self.out.glob("config.*.yaml"))
                path.rename(self.out / f"config.{n}.yaml")
        write_text_atomic(path, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def summary(self) -> dict:
        steps = {}
        for k in STEPS:
            found = find_checkpoint(self.checkpoint(k))
            if found is not None:
                state = read_trainer_state(found)
                steps[str(k)] = {key: v for key, v in state.items() if key != "loader"}
        return {
            "teacher": str(self.cfg.teacher),
            "arch": self.cfg.arch,
            "steps": steps,
            "config": self.cfg.to_dict(),
        }

    def export(self) -> None:
        """Write the latest finished student as a HF folder in OUT, with the teacher's tokenizer.

        radlads.json goes last, with the sha256 of every file written before it: a folder without it
        holds an unfinished export (`radlads verify` says so), one with it can be checked."""
        last = self.latest_complete_before(len(STEPS))
        if last is None:
            return
        source = find_checkpoint(self.checkpoint(last))
        (self.out / SUMMARY_FILE).unlink(missing_ok=True)
        for stale in self.out.glob("model*.safetensors*"):  # a previous export may have been split
            stale.unlink()
        weights = sorted(p.name for p in source.glob("model*.safetensors*"))  # shards + index when split
        written = [name for name in ("config.json", *weights) if (source / name).exists()]
        for name in written:
            (_link_or_copy if name in weights else copy_atomic)(source / name, self.out / name)
        written += [Path(p).name for p in self.tokenizer.save_pretrained(self.out)]
        try:
            GenerationConfig.from_pretrained(self.teacher_dir).save_pretrained(self.out)
        except OSError:  # the teacher has none: keep the student's, which generate() reads
            if (source / "generation_config.json").exists():
                copy_atomic(source / "generation_config.json", self.out / "generation_config.json")
        if (self.out / "generation_config.json").exists():
            written.append("generation_config.json")
        files = {name: sha256_of(self.out / name) for name in sorted(set(written))}
        write_json_atomic(self.out / SUMMARY_FILE, {**self.summary(), "files": files})


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one: a 7B student's weights are ~33 GB, which a
    copy would take again in disk and minutes. The checkpoint is replaced, never written in place,
    so the link keeps the exported version."""
    try:
        os.link(source, target)
    except OSError:
        copy_atomic(source, target)


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Write a checkpoint's student as a Hugging Face folder, in one process on the CPU. A mid-step
    checkpoint's sharded state loads whatever number of processes wrote it."""
    found = find_checkpoint(checkpoint)
    if found is None:
        raise FileNotFoundError(
            f"{checkpoint} is not a radlads checkpoint (no trainer.json there or in {Path(checkpoint).name}.old); "
            "pass a folder such as OUT/checkpoints/step2"
        )
    checkpoint = found
    if is_resumable(checkpoint):
        model = RadladsForCausalLM(RadladsForCausalLM.config_class.from_pretrained(checkpoint))
        load_model_state(checkpoint, model)
    else:
        model = RadladsForCausalLM.from_pretrained(checkpoint)
    model.save_pretrained(out)
    return Path(out)


def same_setting(key: str, old, new) -> bool:
    """Whether a run's recorded setting is the one given now: a teacher by the path it names, however
    written (a trailing slash, ./, absolute or relative from the same folder)."""
    if key == "teacher" and isinstance(old, str) and isinstance(new, str):
        return os.path.realpath(old) == os.path.realpath(new)
    return old == new
