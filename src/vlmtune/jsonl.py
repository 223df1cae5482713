"""The package's one JSONL reader and one writer.

Reading: lines are split on ``\\n`` only. ``str.splitlines()`` (and anything built on it) also
splits on U+2028, U+2029, U+0085, ``\\x1c``-``\\x1e``, ... which are legal raw inside a JSON
string (``json.dumps(..., ensure_ascii=False)`` writes U+2028 as is), so one such character
in a response would cut its record in two. A UTF-8 byte-order mark at the start of the file is
dropped (it would otherwise make the first record unreadable), a ``\\r`` before the ``\\n`` is
JSON whitespace, and blank lines are not records. A line that is not UTF-8 or not JSON is a bad
record named ``file:line``: counted (``read_jsonl(..., strict=False)``, ``iter_jsonl``) or an
error naming it (``strict=True``, the default).

Writing: one object per line, ``ensure_ascii=False`` (readable Chinese), with U+2028, U+2029
and U+0085 escaped (``\\u2028``...): the same JSON value, but a file that every line-splitting
reader (XTuner's, a text editor's, ``splitlines()`` anywhere) reads back line for line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_file

BOM = b"\xef\xbb\xbf"
# Line separators of str.splitlines() that json.dumps(ensure_ascii=False) leaves raw.
_RAW_SEPARATORS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"}


class JsonlError(ValueError):
    """A line that is not a JSON record; ``where`` is ``file:line``."""

    def __init__(self, reason: str, where: str, detail: str):
        super().__init__(f"{where}: {reason}: {detail}")
        self.reason, self.where, self.detail = reason, where, detail


@dataclass
class Line:
    """One non-blank line: its ``file:line``, and either its value or why it has none."""

    where: str
    lineno: int
    value: object = None
    error: JsonlError | None = None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        data = fh.read()
    yield from enumerate(data.removeprefix(BOM).split(b"\n"), 1)


def iter_jsonl(path: Path) -> Iterator[Line]:
    """Every non-blank line of ``path``, parsed; never raises for a bad line."""
    path = Path(path)
    for lineno, raw in _lines(path):
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not raw.strip():
                continue
            yield Line(
                where,
                lineno,
                error=JsonlError(
                    "not_utf8", where, f"byte {raw[exc.start]:#04x} at column {exc.start + 1} is not UTF-8"
                ),
            )
            continue
        # Blank means ASCII whitespace only (bytes.strip): str.strip() would also drop lines of
        # \x1c-\x1f or U+0085, which are content (a bad record to count), not blank lines.
        if not raw.strip():
            continue
        try:
            yield Line(where, lineno, value=json.loads(text))
        except json.JSONDecodeError as exc:
            yield Line(where, lineno, error=JsonlError("malformed_json", where, str(exc)))
        except RecursionError:
            yield Line(where, lineno, error=JsonlError("malformed_json", where, "nested too deeply"))


def read_jsonl(path: Path, strict: bool = True) -> list | tuple[list, list[JsonlError]]:
    """The values of ``path``'s lines. ``strict``: raise JsonlError at the first bad line;
    otherwise return ``(values, bad lines)``."""
    values, bad = [], []
    for line in iter_jsonl(path):
        if line.error is not None:
            if strict:
                raise line.error
            bad.append(line.error)
        else:
            values.append(line.value)
    return values if strict else (values, bad)


def read_records(path: Path) -> list:
    """A ``.json`` file holding one list (or one value), or JSONL otherwise (strict)."""
    path = Path(path)
    if path.suffix == ".json":
        raw = path.read_bytes()
        try:
            return json.loads(raw.removeprefix(BOM))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise JsonlError("malformed_json", str(path), str(exc)) from None
    return read_jsonl(path)


def dumps(value) -> str:
    """One JSON line (without the newline), safe for every line-splitting reader."""
    text = json.dumps(value, ensure_ascii=False)
    if any(sep in text for sep in _RAW_SEPARATORS):
        for sep, escaped in _RAW_SEPARATORS.items():
            text = text.replace(sep, escaped)  # only ever inside strings: JSON has no other place for them
    return text


def write_jsonl(path: Path, values: Iterable) -> None:
    """Atomically write one value per line."""
    with atomic_file(path) as fh:
        fh.writelines(dumps(v) + "\n" for v in values)


def write_records(path: Path, values: list, output_format: str | None = None) -> None:
    """``json``: one list (the tutorial's layout, without its indent); ``jsonl``: a line each.
    Without ``output_format`` the file's suffix decides."""
    output_format = output_format or ("jsonl" if Path(path).suffix == ".jsonl" else "json")
    if output_format == "jsonl":
        return write_jsonl(path, values)
    with atomic_file(path) as fh:
        fh.write(json.dumps(values, ensure_ascii=False))
