"""A training run's folder: config, progress, checkpoints. Writes are atomic.

    RUN/config.json        the TrainConfig (a resumed run must match it)
    RUN/validation.json    the data validation report
    RUN/progress.jsonl     one JSON event per line: start, step, epoch, done, failed
    RUN/status.json        the latest state, rewritten atomically (what a UI polls)
    RUN/last.pt            full checkpoint after every epoch (resume point)
    RUN/best.safetensors   weights of the best epoch so far
    RUN/figures/*.json     plotly figures; RUN/report.json the final evaluation

``last.pt`` is written by this code and read back with ``torch.load(weights_only=True)``:
tensors and plain containers only, nothing executable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from cxr_core.fileio import atomic_write, write_json


class RunDir:
    """``quiet``: events are not written (the other ranks of a data-parallel run)."""

    def __init__(self, root: Path | str, *, quiet: bool = False) -> None:
        self.root = Path(root)
        self.quiet = quiet
        if not quiet:
            self.root.mkdir(parents=True, exist_ok=True)

    config = property(lambda self: self.root / "config.json")
    validation = property(lambda self: self.root / "validation.json")
    progress = property(lambda self: self.root / "progress.jsonl")
    status = property(lambda self: self.root / "status.json")
    last = property(lambda self: self.root / "last.pt")
    best = property(lambda self: self.root / "best.safetensors")
    report = property(lambda self: self.root / "report.json")
    figures = property(lambda self: self.root / "figures")

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one progress event and mirror it into status.json."""
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        if self.quiet:
            return record
        with open(self.progress, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
        write_json(self.status, record)
        return record

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if self.quiet:
            return
        atomic_write(self.last, lambda p: torch.save(state, p))

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.last.exists():
            return None
        return torch.load(self.last, map_location="cpu", weights_only=True)

    def events(self) -> list[dict[str, Any]]:
        if not self.progress.exists():
            return []
        out = []
        for line in self.progress.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
        return out
