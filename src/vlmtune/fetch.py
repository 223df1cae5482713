"""Fetch a model or a dataset into the workflow's data folder, from the Hugging Face Hub
(honours ``HF_ENDPOINT``; the token comes from ``HF_TOKEN`` in the environment and is never
written anywhere), ModelScope, or a local folder, and write ``manifest.json`` beside it
(revision, commit, every file's size and sha256).

Hub downloads go through the hub client's own cache, which resumes interrupted downloads and
which Snakemake does not delete when a job fails; the output folder is then filled from the
cache by hard links (copies across file systems).

    python -m vlmtune.fetch model --source huggingface --repo-id OpenGVLab/InternVL2-2B \
        --revision main --out data/models/InternVL2-2B
    python -m vlmtune.fetch dataset --source local --path data/demo/CLoT-Oogiri-GO \
        --language cn --out data/datasets/CLoT-Oogiri-GO-demo
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from .atomic import atomic_dir, write_json


class FetchError(RuntimeError):
    pass


def dataset_patterns(language: str) -> list[str]:
    """The upstream files a dataset run needs: one language's jsonl and the images."""
    return [f"{language}.jsonl", "images.zip", "images/*", "images/**", "README.md"]


def _hub_help(kind: str, repo_id: str, revision: str, source: str, exc: Exception) -> FetchError:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    where = endpoint if source == "huggingface" else "modelscope.cn"
    return FetchError(
        f"could not fetch {kind} {repo_id}@{revision} from {where}: {type(exc).__name__}: {exc}\n"
        f"  - no network? use a mirror (export HF_ENDPOINT=https://hf-mirror.com), or\n"
        f"  - download it elsewhere and set {kind}.source: local and {kind}.path: /path/to/folder\n"
        f"  - gated or private? export HF_TOKEN=... (never put it in the config)"
    )


def from_huggingface(kind: str, repo_id: str, revision: str, patterns: list[str] | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id=repo_id,
            repo_type="dataset" if kind == "dataset" else "model",
            revision=revision,
            allow_patterns=patterns,
        )
    except Exception as exc:  # the hub client raises many types for "unreachable"
        raise _hub_help(kind, repo_id, revision, "huggingface", exc) from exc
    # The cache folder of a snapshot is named after the commit it resolved to.
    return Path(path), Path(path).name


def from_modelscope(kind: str, repo_id: str, revision: str, patterns: list[str] | None) -> tuple[Path, str]:
    try:
        if kind == "dataset":
            from modelscope.hub.snapshot_download import dataset_snapshot_download as download
        else:
            from modelscope.hub.snapshot_download import snapshot_download as download
        path = download(repo_id, revision=revision, allow_patterns=patterns)
    except ImportError as exc:
        raise FetchError("modelscope is not installed: use envs/data.yaml or `make venv`") from exc
    except Exception as exc:
        raise _hub_help(kind, repo_id, revision, "modelscope", exc) from exc
    return Path(path), revision


def _wanted(rel: PurePosixPath, patterns: list[str] | None) -> bool:
    return patterns is None or any(rel.match(p) or str(rel) == p for p in patterns)


def materialise(src: Path, dst: Path, patterns: list[str] | None) -> None:
    """Hard-link (or copy) the wanted files of ``src`` into ``dst``; never modifies ``src``."""
    src = Path(src)
    if not src.is_dir():
        raise FetchError(f"local source {src} is not a folder")
    for path in sorted(src.rglob("*")):
        rel = PurePosixPath(path.relative_to(src).as_posix())
        if rel.parts[0].startswith(".") or path.is_dir() or not _wanted(rel, patterns):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()  # hub caches hold symlinks to blobs
        try:
            os.link(real, target)
        except OSError:
            shutil.copy2(real, target)


def safe_extract(archive: Path, dest: Path) -> int:
    """Extract ``archive`` into ``dest``, refusing entries that would land outside it
    (absolute paths, ``..``, symbolic links). Returns the number of files extracted."""
    dest = Path(dest).resolve()
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for m in members:
            name = m.filename
            mode = m.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise FetchError(f"{archive}: refusing link entry {name!r}")
            p = PurePosixPath(name.replace("\\", "/"))
            if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
                raise FetchError(f"{archive}: refusing entry {name!r} outside the target folder")
            if not (dest / p).resolve().is_relative_to(dest):
                raise FetchError(f"{archive}: refusing entry {name!r} outside the target folder")
        count = 0
        for m in members:
            if not m.is_dir():
                zf.extract(m, dest)
                count += 1
    return count


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest(folder: Path, **meta) -> dict:
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": sha256(path)}
    return {**meta, "files": files}


def fetch(kind: str, source: str, out: Path, repo_id=None, revision=None, path=None, language=None) -> Path:
    patterns = dataset_patterns(language) if kind == "dataset" else None
    if source == "local":
        if not path or not Path(path).is_dir():
            raise FetchError(f"{kind}.path {path!r} is not a folder (source: local)")
        src, commit = Path(path), None
    elif source == "huggingface":
        src, commit = from_huggingface(kind, repo_id, revision, patterns)
    elif source == "modelscope":
        src, commit = from_modelscope(kind, repo_id, revision, patterns)
    else:
        raise FetchError(f"unknown source {source!r}")
    with atomic_dir(Path(out)) as tmp:
        materialise(src, tmp, patterns)
        extracted = 0
        if kind == "dataset":
            if not (tmp / f"{language}.jsonl").is_file():
                raise FetchError(f"dataset {repo_id or path} has no {language}.jsonl")
            archive = tmp / "images.zip"
            if archive.is_file() and not (tmp / "images").is_dir():
                extracted = safe_extract(archive, tmp)
        meta = dict(kind=kind, source=source, repo_id=repo_id, revision=revision,
                    commit=commit, local_path=str(path) if path else None,
                    extracted_from_zip=extracted)  # fmt: skip
        write_json(tmp / "manifest.json", manifest(tmp, **meta))
    return Path(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Fetch a model or dataset (hub or local folder).")
    ap.add_argument("kind", choices=["model", "dataset"])
    ap.add_argument("--source", required=True, choices=["huggingface", "modelscope", "local"])
    ap.add_argument("--repo-id")
    ap.add_argument("--revision", default="main")
    ap.add_argument("--path")
    ap.add_argument("--language", default="cn")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        out = fetch(args.kind, args.source, args.out, args.repo_id, args.revision, args.path, args.language)
    except FetchError as exc:
        raise SystemExit(f"fetch {args.kind}: {exc}") from None
    print(f"fetched {args.kind} into {out}")


if __name__ == "__main__":
    main()
