"""The held-out evaluation records (``eval.jsonl``, written by ``vlmtune.convert``) as both
evaluation steps read them, and the error both raise."""

from __future__ import annotations

from pathlib import Path

from .jsonl import iter_jsonl


class EvaluateError(Exception):
    """A bad input or setting of an evaluation step (shown as the step's one-line error)."""


def read_eval(path: Path, limit: int | None = None) -> list[dict]:
    """The held-out records (``eval.jsonl``, the project's one JSONL reader: lines split on
    ``\\n`` only, BOM tolerated); EvaluateError naming file:line for a bad line or a missing key."""
    records = []
    for line in iter_jsonl(path):
        if line.error is not None:
            raise EvaluateError(str(line.error))
        rec = line.value
        missing = [
            k for k in ("id", "image", "question", "references") if not isinstance(rec, dict) or k not in rec
        ]
        if missing:
            raise EvaluateError(f"{line.where}: record lacks {', '.join(missing)}")
        records.append(rec)
    return records[:limit] if limit else records
