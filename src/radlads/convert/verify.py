"""`radlads verify OUT`: check a conversion folder against what its export recorded.

The export writes radlads.json last, with the sha256 of each file it wrote; the checkpoints carry
their own trainer.json. Each check gives one finding: ok, missing or corrupt (problems), or a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..files import sha256_of
from ..teachers import TOKENIZER_FILES
from ..train.checkpoint import STATE_DIR, DamagedCheckpoint, find_checkpoint, is_resumable, read_trainer_state
from .inputs import stored_shapes, weight_files
from .pipeline import STEPS, SUMMARY_FILE

RERUN = "re-run the same `radlads convert` command to finish or repair it"


@dataclass(frozen=True)
class Finding:
    kind: str  # "ok", "missing", "corrupt" or "note"
    text: str

    @property
    def problem(self) -> bool:
        return self.kind in ("missing", "corrupt")

    def __str__(self) -> str:
        return f"{self.kind}: {self.text}"


def verify(out: Path) -> list[Finding]:
    out = Path(out)
    if not out.is_dir():
        return [Finding("missing", f"{out} is not a folder")]
    summary, findings = _summary(out)
    findings += _exported_files(out, summary)
    for step in STEPS:
        findings += _checkpoint(out, step, str(step) in summary.get("steps", {}))
    return findings


def _summary(out: Path) -> tuple[dict, list[Finding]]:
    path = out / SUMMARY_FILE
    if not path.is_file():
        return {}, [Finding("missing", f"{SUMMARY_FILE}: the export did not finish; {RERUN}")]
    try:
        return json.loads(path.read_text()), [Finding("ok", SUMMARY_FILE)]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return {}, [Finding("corrupt", f"{SUMMARY_FILE} ({err}); {RERUN}")]


def _exported_files(out: Path, summary: dict) -> list[Finding]:
    findings = [_config(out / "config.json"), _weights(out, "weights", RERUN), _tokenizer(out)]
    recorded = summary.get("files")
    if summary and recorded is None:
        findings.append(Finding("note", f"{SUMMARY_FILE} records no hashes (an older export): {RERUN}"))
    for name, sha in (recorded or {}).items():
        path = out / name
        if not path.is_file():
            findings.append(Finding("missing", f"{name}, recorded at export; {RERUN}"))
        elif sha256_of(path) != sha:
            findings.append(Finding("corrupt", f"{name}: its sha256 differs from the export's; {RERUN}"))
        else:
            findings.append(Finding("ok", f"{name} (sha256 as exported)"))
    return findings


def _config(path: Path) -> Finding:
    if not path.is_file():
        return Finding("missing", f"{path.name}; {RERUN}")
    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return Finding("corrupt", f"{path.name} ({err}); {RERUN}")
    return Finding("ok", path.name)


def _weights(folder: Path, label: str, remedy: str) -> Finding:
    """The weight files are present and their headers cover their sizes (a cut file fails)."""
    try:
        files = weight_files(folder)
        count = len(stored_shapes(files))
    except FileNotFoundError as err:
        return Finding("missing", f"{label}: {err}; {remedy}")
    except ValueError as err:
        return Finding("corrupt", f"{label}: {err}; {remedy}")
    return Finding("ok", f"{label}: {', '.join(p.name for p in files)} ({count} tensors)")


def _tokenizer(out: Path) -> Finding:
    if any((out / name).is_file() for name in TOKENIZER_FILES):
        return Finding("ok", "tokenizer")
    return Finding("missing", f"tokenizer (none of {', '.join(TOKENIZER_FILES)}); {RERUN}")


def _checkpoint(out: Path, step: int, recorded: bool) -> list[Finding]:
    path = out / "checkpoints" / f"step{step}"
    state = _checkpoint_state(out, path, recorded)
    findings = [] if state is None else [state]
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        findings.append(
            Finding(
                "note", f"{tmp.relative_to(out)}: an interrupted checkpoint write; the next run replaces it"
            )
        )
    return findings


def _checkpoint_state(out: Path, path: Path, recorded: bool) -> Finding | None:
    found = find_checkpoint(path)
    if found is None:
        return (
            Finding("missing", f"{path.relative_to(out)}, recorded in {SUMMARY_FILE}; {RERUN}")
            if recorded
            else None
        )
    where = str(found.relative_to(out))
    # A rerun skips a step whose checkpoint says it finished, damaged or not: only deleting it redoes it.
    redo = f"delete {found} and re-run the same `radlads convert` command to redo that step"
    try:
        state = read_trainer_state(found)
    except DamagedCheckpoint:
        return Finding("corrupt", f"{where}/trainer.json is not readable; {redo}")
    if is_resumable(found):
        return Finding("ok", f"{where}: mid-step checkpoint at {state.get('tokens')} tokens ({STATE_DIR}/)")
    if not state.get("complete"):
        return Finding("corrupt", f"{where}: neither a finished step nor a resumable checkpoint; {redo}")
    return _weights(found, where, redo)
