"""Fetch a model or a dataset into the workflow's data folder, from the Hugging Face Hub
(honours ``HF_ENDPOINT``; the token comes from ``HF_TOKEN`` in the environment and is never
written anywhere), ModelScope, or a local folder, and write ``manifest.json`` beside it
(revision, the commit it resolved to, every file's size and sha256, which hub hash was checked).

Hub downloads: the revision is resolved to a commit once (``/api/.../revision/<rev>`` with file
metadata), then each wanted file is fetched at that commit through the hub client's cache. The
cache keeps completed files and the partial ``<blob>.incomplete`` of the current one, and
Snakemake does not delete it when a job fails, so a rerun asks only for the missing bytes
(``Range``) and skips finished files. Each request is retried with exponential backoff on
transient errors (HTTP 408/425/429/5xx, dropped connections, timeouts, a hash mismatch) and
fails at once on permanent ones (401/403 gated or private, 404 repository/revision/file, no
route to the hub, offline mode) with a message naming repo, revision and what to try. Every
file is checked against the hub's hash: ``lfs.sha256`` for LFS files, the git blob sha1
(``blobId``) otherwise. Progress is printed as log lines (the hub client's bars are off when
stderr is not a terminal, which is the case under Snakemake's ``> {log} 2>&1``). The output
folder is then filled from the cache by hard links (copies across file systems).

    python -m vlmtune.fetch model --source huggingface --repo-id OpenGVLab/InternVL2-2B \
        --revision main --out data/models/InternVL2-2B
    python -m vlmtune.fetch dataset --source local --path data/demo/CLoT-Oogiri-GO \
        --language cn --out data/datasets/CLoT-Oogiri-GO-demo
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import random
import shutil
import stat
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .atomic import atomic_dir, write_json
from .hashing import sha256


class FetchError(RuntimeError):
    """A download or local copy that cannot give a usable folder (the step's one-line error)."""


def dataset_patterns(language: str) -> list[str]:
    """The upstream files a dataset run needs: one language's jsonl and the images."""
    return [f"{language}.jsonl", "images.zip", "images/*", "images/**", "README.md"]


# HTTP statuses worth retrying: the server is busy or briefly down; anything else in 4xx means
# the request itself is wrong (missing repo or file, no access), so retrying cannot help.
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class RetryPolicy:
    """Attempts per request and the exponential backoff between them (base · 2^k, capped)."""

    attempts: int = 6
    base_delay: float = 2.0
    max_delay: float = 60.0

    def delay(self, attempt: int) -> float:
        # A little jitter so that parallel jobs hitting the same hub spread out.
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * random.uniform(1.0, 1.25)


class HashMismatch(FetchError):
    """A downloaded file disagrees with the hash the hub lists for it (the blob is discarded)."""


def _causes(exc: BaseException):
    """The exception, its causes and what requests/urllib3 wrap inside (``args[0]``, ``reason``)."""
    seen, todo = [], [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None)]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return [e for e in seen if isinstance(e, BaseException)]


def classify(exc: BaseException) -> tuple[bool, str]:
    """(transient?, what went wrong) for an error raised while talking to the hub."""
    import requests
    import urllib3.exceptions as u3
    from huggingface_hub import errors as hub

    # LocalEntryNotFoundError (an EntryNotFoundError) only wraps the real cause: "not in the
    # cache after the HEAD request failed"; judge by what it wraps.
    causes = [e for e in _causes(exc) if not isinstance(e, hub.LocalEntryNotFoundError)]
    verdicts = [  # the hub's own verdicts, most specific first: never worth a retry
        (hub.GatedRepoError, "the repository is gated (401/403)"),
        (hub.RepositoryNotFoundError, "repository not found, or private without a token (401/404)"),
        (hub.RevisionNotFoundError, "revision not found (404)"),
        (hub.EntryNotFoundError, "file not found at this revision (404)"),
        (hub.DisabledRepoError, "the repository is disabled"),
        (hub.OfflineModeIsEnabled, "offline mode is on (HF_HUB_OFFLINE)"),
    ]
    for e in causes:
        if getattr(e, "verdict", None):  # set where the error was raised (vlmtune's ModelScope listing)
            return False, e.verdict
        for kind, why in verdicts:
            if isinstance(e, kind):
                return False, why
        if isinstance(e, HashMismatch):
            return True, str(e)
    for e in causes:
        if isinstance(
            e, (requests.Timeout, u3.ConnectTimeoutError, u3.ReadTimeoutError, TimeoutError)
        ) and not isinstance(e, u3.NewConnectionError):
            return True, f"timeout ({type(e).__name__})"
        if isinstance(e, u3.NewConnectionError):
            # DNS failure, network unreachable, connection refused: no route to the hub at all.
            return False, f"cannot connect, no network? ({e})"
        response = getattr(e, "response", None)
        if isinstance(e, requests.HTTPError) and response is not None:
            code = response.status_code
            return code in TRANSIENT_STATUS, f"HTTP {code}"
    for e in causes:
        if isinstance(
            e,
            (
                requests.ConnectionError,
                requests.exceptions.ChunkedEncodingError,
                u3.ProtocolError,
                ConnectionError,
            ),
        ):
            return True, f"connection lost ({type(e).__name__})"
    return False, f"{type(exc).__name__}: {exc}"


def public_endpoint(endpoint: str | None = None) -> str:
    """An endpoint (default HF_ENDPOINT) as it may be written to logs and manifests: a mirror URL
    can carry credentials (https://user:token@host), which are dropped."""
    from urllib.parse import urlsplit, urlunsplit

    url = urlsplit(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or ""
    netloc = host + (f":{url.port}" if url.port else "")
    return urlunsplit((url.scheme, netloc, url.path, url.query, url.fragment))


def _hub_help(
    kind: str,
    repo_id: str,
    revision: str,
    source: str,
    exc: Exception,
    why: str = "",
    attempts: int = 1,
    cache: str | None = None,
) -> FetchError:
    where = public_endpoint() if source == "huggingface" else public_endpoint(modelscope_endpoint())
    head = f"could not fetch {kind} {repo_id}@{revision} from {where}: {why or type(exc).__name__}"
    if attempts > 1:
        head += f" (gave up after {attempts} attempts)"
    tips = []
    if "gated" in why or "not found, or private" in why:
        tips.append(
            "gated or private? accept its licence on the hub page, then export HF_TOKEN=... "
            "(never put it in the config)"
        )
    if "revision" in why:
        tips.append(
            f"check {kind}.revision: a branch, a tag or a 40-character commit of {repo_id}"
            if source == "huggingface"
            else f"check {kind}.revision: a branch or tag of {repo_id} (ModelScope's default branch is "
            "master)"
        )
    if "not found" in why:
        tips.append(f"check {kind}.repo_id ({repo_id}) and that the repository is a {kind}")
    if attempts > 1:
        tips.append(
            "the hub is failing right now: rerun later; completed files and the partial one stay "
            f"in the hub cache{f' ({cache})' if cache else ''} and the download resumes there"
        )
    tips += [
        "no network? use a mirror (export HF_ENDPOINT=https://hf-mirror.com), or"
        if source == "huggingface"
        else "no network? set MODELSCOPE_DOMAIN to a reachable ModelScope host, or use source: "
        "huggingface, or",
        f"download it elsewhere and set {kind}.source: local and {kind}.path: /path/to/folder",
    ]
    err = FetchError(
        f"{head}\n  last error: {type(exc).__name__}: {str(exc).strip()[:500]}\n  - " + "\n  - ".join(tips)
    )
    err.transient = attempts > 1
    return err


def with_retries(what: str, fn, policy: RetryPolicy, log=print):
    """Call ``fn`` until it succeeds, retrying transient hub errors with exponential backoff.
    Returns (result, attempts used); raises the last error with ``.why`` and ``.attempts`` set."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn(), attempt
        except FetchError as exc:
            if not isinstance(exc, HashMismatch):
                raise
            transient, why = True, str(exc)
        except Exception as exc:  # the hub client raises many types; classify() sorts them
            transient, why = classify(exc)
            if not transient or attempt == policy.attempts:
                exc.why, exc.attempts = why, attempt
                raise
        if attempt == policy.attempts:
            raise FetchError(f"{what}: {why} (after {attempt} attempts)")
        delay = policy.delay(attempt)
        log(
            f"{what}: attempt {attempt}/{policy.attempts} failed: {why}; retrying in {delay:.1f} s",
            flush=True,
        )
        time.sleep(delay)
    raise AssertionError("unreachable")


def git_blob_sha1(path: Path) -> str:
    """The hub's ``blobId`` of a non-LFS file: git's object hash of its content."""
    h = hashlib.sha1(b"blob %d\0" % Path(path).stat().st_size)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class Progress:
    """Log lines (not a terminal bar: logs are files) with the bytes on disk of a download,
    read from the hub cache's ``<blob>.incomplete`` every ``interval`` seconds."""

    def __init__(self, name: str, total: int, partial: Path, interval: float = 10.0):
        self.name, self.total, self.partial, self.interval = name, total, partial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        try:
            return self.partial.stat().st_size
        except FileNotFoundError:
            return 0

    def _run(self):
        start, first = time.monotonic(), self._size()
        while not self._stop.wait(self.interval):
            done = self._size()
            rate = (done - first) / max(time.monotonic() - start, 1e-9) / 1e6
            print(
                f"  {self.name}: {done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
                f"({100 * done / max(self.total, 1):.0f}%), {rate:.1f} MB/s",
                flush=True,
            )

    def __enter__(self):
        if self._size():
            print(
                f"  {self.name}: resuming from {self._size() / 1e6:.1f}/{self.total / 1e6:.1f} MB", flush=True
            )
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def from_huggingface(
    kind: str,
    repo_id: str,
    revision: str,
    patterns: list[str] | None,
    policy: RetryPolicy | None = None,
    cache_dir: str | None = None,
    progress_interval: float = 10.0,
) -> tuple[Path, str, dict]:
    """Download the wanted files of ``repo_id@revision`` into the hub cache, one by one, each
    retried on transient errors and checked against the hub's hash. Returns (snapshot folder,
    commit, {file: {"sha256", "hub_check"}})."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import filter_repo_objects

    policy = policy or RetryPolicy()
    repo_type = "dataset" if kind == "dataset" else "model"
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not at the hub client's import
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)

    def fail(exc, attempts=None):
        why = getattr(exc, "why", None) or classify(exc)[1]
        return _hub_help(
            kind,
            repo_id,
            revision,
            "huggingface",
            exc,
            why,
            attempts or getattr(exc, "attempts", 1),
            str(cache),
        )

    try:
        info, _ = with_retries(
            f"{repo_id}@{revision}: file list",
            lambda: HfApi(endpoint=endpoint).repo_info(
                repo_id, repo_type=repo_type, revision=revision, files_metadata=True
            ),
            policy,
        )
    except Exception as exc:
        raise fail(exc) from exc
    commit = info.sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    wanted = sorted(filter_repo_objects(list(siblings), allow_patterns=patterns))
    print(
        f"{repo_id}@{revision} is commit {commit}: {len(wanted)} files, "
        f"{sum(siblings[n].size or 0 for n in wanted) / 1e6:.1f} MB",
        flush=True,
    )

    checked: dict[str, dict] = {}
    for i, name in enumerate(wanted, 1):
        s = siblings[name]
        blob = storage / "blobs" / (s.lfs.sha256 if s.lfs else s.blob_id or "?")

        def download_and_check(name=name, s=s, blob=blob):
            with Progress(name, s.size or 0, blob.with_name(blob.name + ".incomplete"), progress_interval):
                path = Path(
                    hf_hub_download(
                        repo_id,
                        name,
                        repo_type=repo_type,
                        revision=commit,
                        cache_dir=str(cache),
                        endpoint=endpoint,
                    )
                )
            return path, verify_hub_hash(path, s)

        print(f"[{i}/{len(wanted)}] {name} ({(s.size or 0) / 1e6:.1f} MB)", flush=True)
        try:
            (_path, entry), _ = with_retries(f"{repo_id}@{revision}: {name}", download_and_check, policy)
        except Exception as exc:
            raise fail(exc, policy.attempts if isinstance(exc, FetchError) else None) from exc
        checked[name] = entry
    return storage / "snapshots" / commit, commit, checked


def verify_hub_hash(path: Path, sibling) -> dict:
    """Check a downloaded file against the size and hash the hub lists (sha256 for LFS files,
    git's blob sha1 otherwise). On a mismatch the cached blob is removed so a retry re-fetches."""
    real = Path(path).resolve()
    digest = sha256(real)
    if sibling.lfs:
        expected, actual, check = sibling.lfs.sha256, digest, "lfs_sha256"
    elif sibling.blob_id:
        expected, actual, check = sibling.blob_id, git_blob_sha1(real), "git_blob_sha1"
    else:
        expected = actual = check = None
    size = real.stat().st_size
    if (sibling.size is not None and size != sibling.size) or expected != actual:
        real.unlink(missing_ok=True)
        Path(path).unlink(missing_ok=True)
        raise HashMismatch(
            f"{sibling.rfilename}: {check} {actual} (size {size}) differs from the hub's "
            f"{expected} (size {sibling.size}); the cached copy was discarded"
        )
    return {"sha256": digest, "hub_check": check}


def modelscope_endpoint() -> str:
    """The ModelScope endpoint: ``MODELSCOPE_DOMAIN`` (the client's own variable: a host name,
    reached over https) or, when it holds a scheme, that URL as is (a mirror, a test server)."""
    domain = (os.environ.get("MODELSCOPE_DOMAIN") or "www.modelscope.cn").rstrip("/")
    return domain if "://" in domain else f"https://{domain}"


def _modelscope_listing(api, kind: str, repo_id: str, revision: str) -> tuple[list[dict], str | None]:
    """(the repository's files at ``revision``, the commit when the hub says it), through the
    modelscope client's own API calls."""
    from modelscope.hub.errors import NotExistError, RequestError

    if kind == "model":
        try:
            detail = api.get_valid_revision_detail(repo_id, revision=revision)
        except NotExistError as exc:
            exc.verdict = "revision not found"
            raise
        files = api.get_model_files(repo_id, revision=detail["Revision"], recursive=True)
        commit = detail.get("CommitId")
    else:
        owner, name = repo_id.split("/", 1)
        try:
            api.get_dataset_id_and_type(dataset_name=name, namespace=owner)
        except RequestError as exc:
            exc.verdict = "repository not found"
            raise
        files, page = [], 1
        while True:
            try:  # the repository exists (above): a refusal here is the revision's
                tree = api.list_repo_tree(
                    dataset_name=name,
                    namespace=owner,
                    revision=revision,
                    root_path="/",
                    recursive=True,
                    page_number=page,
                    page_size=150,
                )
            except RequestError as exc:
                exc.verdict = "revision not found"
                raise
            files += tree["Data"]["Files"]
            if len(tree["Data"]["Files"]) < 150:
                break
            page += 1
        commit = None
    files = [f for f in files if f.get("Type") != "tree"]
    commits = {f.get("Revision") for f in files}
    return files, commit or (commits.pop() if len(commits) == 1 else None)


def _stream(url: str, part: Path, size: int, cookies=None) -> None:
    """Append the bytes of ``url`` missing from ``part`` (``Range``), flushing each chunk so an
    interrupted job leaves them on disk."""
    import requests

    start = part.stat().st_size if part.exists() else 0
    if start > size:
        part.unlink()
        start = 0
    if start == size:
        return
    headers = {"Range": f"bytes={start}-"} if start else {}
    with requests.get(url, headers=headers, cookies=cookies, stream=True, timeout=(10, 60)) as r:
        r.raise_for_status()
        mode = "ab" if start and r.status_code == 206 else "wb"
        with open(part, mode) as fh:
            for chunk in r.iter_content(1 << 20):
                fh.write(chunk)
                fh.flush()
    if part.stat().st_size != size:
        raise requests.exceptions.ChunkedEncodingError(f"got {part.stat().st_size} of {size} bytes")


def _modelscope_blob(
    url: str, blob: Path, name: str, size: int, expected: str | None, cookies, progress_interval: float
) -> dict:
    """One ModelScope file into ``blob`` (resuming ``<blob>.incomplete``), checked against the
    listing's sha256 when it gives one; a mismatch discards the partial copy (a retry refetches)."""
    part = blob.with_name(blob.name + ".incomplete")
    if not blob.is_file():
        with Progress(name, size, part, progress_interval):
            _stream(url, part, size, cookies)
        if expected:
            actual = sha256(part)
            if actual != expected:
                part.unlink()
                raise HashMismatch(
                    f"{name}: sha256 {actual} differs from ModelScope's {expected}; "
                    "the partial copy was discarded"
                )
        os.replace(part, blob)
    return {"sha256": expected or sha256(blob), "hub_check": "modelscope_sha256" if expected else None}


def from_modelscope(
    kind: str,
    repo_id: str,
    revision: str,
    patterns: list[str] | None,
    policy: RetryPolicy | None = None,
    cache_dir: str | None = None,
    progress_interval: float = 10.0,
) -> tuple[Path, str | None, dict]:
    """Download the wanted files of ``repo_id@revision`` from ModelScope: the file list through
    the ``modelscope`` client's API (revision checked by the client: a branch or tag), each file
    by the client's download URL into ``<cache>/vlmtune/<kind>s/<repo>/blobs`` with the project's
    retries, ``Range`` resume of a partial file and the check against the ``Sha256`` the listing
    gives. (The client's own ``snapshot_download`` ignores a file that fails in its download
    threads and retries a 404 for half a minute, so it is not used.) Returns (snapshot folder,
    commit or None, {file: {"sha256", "hub_check"}})."""
    import fnmatch
    from urllib.parse import quote_plus

    try:
        from modelscope.hub.api import HubApi, ModelScopeConfig
    except ImportError as exc:
        raise FetchError("modelscope is not installed: use envs/data.yaml or `make venv`") from exc
    policy = policy or RetryPolicy()
    endpoint = modelscope_endpoint()
    cache = Path(cache_dir or os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope")
    storage = cache / "vlmtune" / f"{kind}s" / repo_id
    api = HubApi(endpoint=endpoint, max_retries=0)  # one retry layer: ours

    def fail(exc, attempts=None):
        why = getattr(exc, "why", None) or classify(exc)[1]
        if why == "HTTP 404" and not checked:
            why = "repository not found (404)"
        return _hub_help(
            kind,
            repo_id,
            revision,
            "modelscope",
            exc,
            why,
            attempts or getattr(exc, "attempts", 1),
            str(cache),
        )

    checked: dict[str, dict] = {}
    try:
        (files, commit), _ = with_retries(
            f"{repo_id}@{revision}: file list",
            lambda: _modelscope_listing(api, kind, repo_id, revision),
            policy,
        )
    except Exception as exc:
        raise fail(exc) from exc
    wanted = sorted(
        (f for f in files if patterns is None or any(fnmatch.fnmatch(f["Path"], p) for p in patterns)),
        key=lambda f: f["Path"],
    )
    print(
        f"{repo_id}@{revision} (ModelScope{f', commit {commit}' if commit else ''}): {len(wanted)} files, "
        f"{sum(f.get('Size') or 0 for f in wanted) / 1e6:.1f} MB",
        flush=True,
    )
    cookies = ModelScopeConfig.get_cookies()
    snapshot = storage / "snapshots" / hashlib.sha256(f"{revision}\0{commit}".encode()).hexdigest()[:16]
    shutil.rmtree(snapshot, ignore_errors=True)
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(wanted, 1):
        name, size, expected = f["Path"], int(f.get("Size") or 0), f.get("Sha256")
        key = expected or hashlib.sha256(f"{revision}\0{commit}\0{name}\0{size}".encode()).hexdigest()
        blob = storage / "blobs" / key
        if kind == "model":
            url = (
                f"{endpoint}/api/v1/models/{repo_id}/repo"
                f"?Revision={quote_plus(revision)}&FilePath={quote_plus(name)}"
            )
        else:
            owner, ds = repo_id.split("/", 1)
            url = api.get_dataset_file_url(
                file_name=name, dataset_name=ds, namespace=owner, revision=revision
            )

        print(f"[{i}/{len(wanted)}] {name} ({size / 1e6:.1f} MB)", flush=True)
        try:
            checked[name], _ = with_retries(
                f"{repo_id}@{revision}: {name}",
                functools.partial(
                    _modelscope_blob, url, blob, name, size, expected, cookies, progress_interval
                ),
                policy,
            )
        except Exception as exc:
            raise fail(exc, policy.attempts if isinstance(exc, FetchError) else None) from exc
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(blob, target)  # same folder tree: a link always works
    return snapshot, commit, checked


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


@dataclass
class ExtractLimits:
    """What an archive may unpack to: ``max_bytes`` in all (a real ``images.zip`` is 1.3 GB of
    JPEGs that unpack to about as much) and, for entries over ``ratio_floor`` bytes, at most
    ``max_ratio`` times their compressed size (JPEGs barely compress; a zip bomb's entries reach
    1000x)."""

    max_bytes: int = 16 * 2**30
    max_ratio: float = 100.0
    ratio_floor: int = 2**20


def _limit_error(archive: Path, name: str, what: str) -> FetchError:
    return FetchError(
        f"{archive}: entry {name!r} {what}; extraction stopped (raise "
        "extraction.max_bytes / extraction.max_ratio if the archive is genuine)"
    )


def safe_extract(archive: Path, dest: Path, limits: ExtractLimits | None = None) -> int:
    """Extract ``archive`` into ``dest``, refusing entries that would land outside it
    (absolute paths, ``..``, symbolic links) and archives over ``limits``: the sizes the
    archive declares are checked first, then the bytes actually inflated are counted while
    writing, so a lying header stops the extraction before it writes past a cap. Returns the
    number of files extracted."""
    try:
        return _extract(archive, Path(dest).resolve(), limits or ExtractLimits())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise FetchError(f"{archive}: not a readable zip archive ({type(exc).__name__}: {exc})") from None


def _extract(archive: Path, dest: Path, limits: ExtractLimits) -> int:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        declared = 0
        for m in members:
            name = m.filename
            mode = m.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise FetchError(f"{archive}: refusing link entry {name!r}")
            p = PurePosixPath(name.replace("\\", "/"))
            if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]) or "\0" in name:
                raise FetchError(f"{archive}: refusing entry {name!r} outside the target folder")
            if not (dest / p).resolve().is_relative_to(dest):
                raise FetchError(f"{archive}: refusing entry {name!r} outside the target folder")
            declared += m.file_size
            if declared > limits.max_bytes:
                raise _limit_error(
                    archive,
                    name,
                    f"takes the unpacked size to {declared:,} bytes, over the "
                    f"limit of {limits.max_bytes:,} (extraction.max_bytes)",
                )
            if m.file_size > limits.ratio_floor and m.file_size > limits.max_ratio * max(m.compress_size, 1):
                raise _limit_error(
                    archive,
                    name,
                    f"unpacks {m.file_size:,} bytes from {m.compress_size:,} "
                    f"(ratio over the limit of {limits.max_ratio:g}, extraction.max_ratio)",
                )
        count, written = 0, 0
        for m in members:
            target = dest / PurePosixPath(m.filename.replace("\\", "/"))
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            entry, cap = 0, max(m.file_size, limits.ratio_floor, limits.max_ratio * max(m.compress_size, 1))
            with zf.open(m) as src, open(target, "wb") as out:
                while block := src.read(1 << 20):
                    entry, written = entry + len(block), written + len(block)
                    if written > limits.max_bytes:
                        raise _limit_error(
                            archive,
                            m.filename,
                            f"inflates past the limit of {limits.max_bytes:,} "
                            "bytes in all (extraction.max_bytes)",
                        )
                    if entry > cap:
                        raise _limit_error(
                            archive,
                            m.filename,
                            f"inflates past {cap:,.0f} bytes (ratio limit "
                            f"{limits.max_ratio:g}, extraction.max_ratio)",
                        )
                    out.write(block)
            count += 1
    return count


def manifest(folder: Path, known: dict[str, dict] | None = None, **meta) -> dict:
    """Every file's size and sha256 (and, for downloaded files, which hub hash was checked);
    ``known`` holds hashes already computed during the download (same bytes: hard links)."""
    known = known or {}
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            rel = path.relative_to(folder).as_posix()
            entry = {"size": path.stat().st_size, "sha256": known.get(rel, {}).get("sha256") or sha256(path)}
            if rel in known:
                entry["hub_check"] = known[rel].get("hub_check")
            files[rel] = entry
    return {**meta, "files": files}


def fetch(
    kind: str,
    source: str,
    out: Path,
    repo_id=None,
    revision=None,
    path=None,
    language=None,
    policy: RetryPolicy | None = None,
    cache_dir: str | None = None,
    limits: ExtractLimits | None = None,
) -> Path:
    """Materialise a model or dataset (``kind``) from ``source`` (huggingface, modelscope or a
    local folder) into ``out``, atomically, with a ``manifest.json`` of every file (size, sha256;
    hub files checked against the hub's own hashes) and where it came from. A dataset must hold
    ``<language>.jsonl``; its ``images.zip`` is extracted within ``limits``. Hub requests retry per
    ``policy``. Returns ``out``; raises FetchError (unknown source, missing folder or file, hub
    failure after the retries, unsafe archive)."""
    patterns = dataset_patterns(language) if kind == "dataset" else None
    checked: dict[str, dict] = {}
    if source == "local":
        if not path or not Path(path).is_dir():
            raise FetchError(f"{kind}.path {path!r} is not a folder (source: local)")
        src, commit = Path(path), None
    elif source == "huggingface":
        src, commit, checked = from_huggingface(kind, repo_id, revision, patterns, policy, cache_dir)
    elif source == "modelscope":
        src, commit, checked = from_modelscope(kind, repo_id, revision, patterns, policy, cache_dir)
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
                extracted = safe_extract(archive, tmp, limits)
        endpoint = {
            "huggingface": public_endpoint,
            "modelscope": lambda: public_endpoint(modelscope_endpoint()),
        }.get(source, lambda: None)()
        meta = {
            "kind": kind,
            "source": source,
            "repo_id": repo_id,
            "revision": revision,
            "commit": commit,
            "endpoint": endpoint,
            "local_path": str(path) if path else None,
            "extracted_from_zip": extracted,
            "hub_checked_files": sum(1 for v in checked.values() if v.get("hub_check")),
        }
        write_json(tmp / "manifest.json", manifest(tmp, checked, **meta))
    return Path(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Fetch a model or dataset (hub or local folder).")
    ap.add_argument("kind", choices=["model", "dataset"])
    ap.add_argument("--source", required=True, choices=["huggingface", "modelscope", "local"])
    ap.add_argument("--repo-id")
    ap.add_argument("--revision", default="main")
    ap.add_argument("--path")
    ap.add_argument("--language", default="cn")
    ap.add_argument("--attempts", type=int, default=RetryPolicy.attempts, help="tries per request")
    ap.add_argument("--backoff", type=float, default=RetryPolicy.base_delay, help="first retry delay, s")
    ap.add_argument(
        "--max-extract-bytes",
        type=int,
        default=ExtractLimits.max_bytes,
        help="unpacked size limit of images.zip, bytes (extraction.max_bytes)",
    )
    ap.add_argument(
        "--max-extract-ratio",
        type=float,
        default=ExtractLimits.max_ratio,
        help="per-entry unpacked/compressed limit (extraction.max_ratio)",
    )
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    policy = RetryPolicy(attempts=max(1, args.attempts), base_delay=args.backoff)
    limits = ExtractLimits(max_bytes=args.max_extract_bytes, max_ratio=args.max_extract_ratio)
    try:
        out = fetch(
            args.kind,
            args.source,
            args.out,
            args.repo_id,
            args.revision,
            args.path,
            args.language,
            policy,
            limits=limits,
        )
    except FetchError as exc:
        raise SystemExit(f"fetch {args.kind}: {exc}") from None
    print(f"fetched {args.kind} into {out}")


if __name__ == "__main__":
    main()
