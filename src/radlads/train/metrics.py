"""Training metrics to `metrics.jsonl` (one JSON object per logged update) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_text_atomic


class MetricsLog:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb_dir = Path(out_dir) / "tensorboard"
        self._writer = None

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tb_dir))
        return self._writer

    def forget_after(self, step: int, tokens: int) -> None:
        """On resume, drop what a killed run logged past its last checkpoint, so no point appears
        twice. A line the kill cut short is dropped too: it was logged past the checkpoint."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (record["step"] == step and record["tokens"] > tokens):
                kept.append(line + "\n")
        write_text_atomic(self.path, "".join(kept))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        for key, value in record.items():
            if key not in ("step", "tokens") and isinstance(value, (int, float)):
                writer.add_scalar(f"step{record['step']}/{key}", value, record["tokens"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
