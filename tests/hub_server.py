"""A loopback HTTP server speaking enough of the Hugging Face Hub's protocol for the real
``huggingface_hub`` client (0.27.1) to download from it with ``HF_ENDPOINT`` pointing here:

- ``GET /api/{models,datasets}/{repo}/revision/{rev}[?blobs=True]``: the commit and the file
  list (``siblings`` with ``size``, ``blobId`` and, for LFS files, ``lfs.sha256``);
- ``HEAD``/``GET /[datasets/]{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (git
  blob sha1, or ``X-Linked-Etag`` = sha256 for LFS files), ``Content-Length`` and ``Range`` /
  206 partial content;
- the hub's error headers (``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``).

Faults are injected per request path: a status code, a dropped connection after N body bytes,
a stall after N body bytes (the client then waits until it is killed), or a corrupted body. Every request is
recorded (method, path, Range header) so tests can assert what the client asked for.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "c0ffee" * 6 + "beef"
    branches: dict[str, str] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)  # files served as LFS (sha256 etag)

    def resolve(self, rev: str) -> str | None:
        if rev == self.commit:
            return rev
        return self.commit if rev in self.branches or rev == "main" else None

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        info = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
        if name in self.lfs:
            info["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return info


@dataclass
class Fault:
    path_suffix: str  # matched against the request path's end
    kind: str  # "status" | "drop" | "stall" | "corrupt" (one byte flipped, same size)
    times: int = 1  # how many matching requests it hits
    status: int = 503
    after_bytes: int = 0  # for drop/stall: body bytes sent first
    methods: tuple = ("GET",)


class HubServer:
    def __init__(self, repos: dict[tuple[str, str], Repo]):
        self.repos = repos  # (repo_type "model"|"dataset", repo_id) -> Repo
        self.requests: list[tuple[str, str, str | None]] = []
        self.faults: list[Fault] = []
        self.sent: dict[str, int] = {}  # path -> body bytes sent (all requests)
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def fault(self, **kw) -> Fault:
        f = Fault(**kw)
        self.faults.append(f)
        return f

    def requested(self, method: str | None = None, suffix: str = "") -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if (method is None or r[0] == method) and r[1].endswith(suffix)]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.times > 0 and method in f.methods and path.endswith(f.path_suffix):
                    f.times -= 1
                    return f
        return None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                self._serve("HEAD")

            def do_GET(self):
                self._serve("GET")

            def _error(self, status: int, code: str | None = None):
                body = json.dumps({"error": code or f"status {status}"}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _serve(self, method: str):
                path = unquote(urlsplit(self.path).path)
                server.requests.append((method, path, self.headers.get("Range")))
                fault = server._take_fault(method, path)
                if fault is not None and fault.kind == "status":
                    return self._error(fault.status)
                parts = path.strip("/").split("/")
                if parts[:1] == ["api"] and len(parts) >= 6 and parts[4] == "revision":
                    return self._api(parts[1].rstrip("s"), f"{parts[2]}/{parts[3]}", "/".join(parts[5:]))
                repo_type = "model"
                if parts[:1] == ["datasets"]:
                    repo_type, parts = "dataset", parts[1:]
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._file(
                        method, repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), fault
                    )
                return self._error(404)

            def _lookup(self, repo_type: str, repo_id: str, rev: str):
                """(repo, commit), or (None, None) after answering the hub's 404."""
                repo = server.repos.get((repo_type, repo_id))
                commit = repo.resolve(rev) if repo else None
                if commit is None:
                    self._error(404, "RevisionNotFound" if repo else "RepoNotFound")
                return repo, commit

            def _api(self, repo_type: str, repo_id: str, rev: str):
                repo, commit = self._lookup(repo_type, repo_id, rev)
                if commit is None:
                    return
                body = json.dumps(
                    {
                        "id": repo_id,
                        "sha": commit,
                        "private": False,
                        "siblings": [repo.sibling(n) for n in sorted(repo.files)],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, method, repo_type, repo_id, rev, name, fault):
                repo, commit = self._lookup(repo_type, repo_id, rev)
                if commit is None:
                    return
                if name not in repo.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", commit)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = repo.files[name]
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                sibling = repo.sibling(name)
                if name in repo.lfs:
                    self.send_header("X-Linked-Etag", f'"{sibling["lfs"]["sha256"]}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{sibling["blobId"]}"')
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self._deliver(method, name, body, fault)

            def _deliver(self, method, name, body, fault):
                """The body after the headers, with a drop, stall or corruption fault applied."""
                if method == "HEAD":
                    return
                if fault is not None and fault.kind in ("drop", "stall"):
                    self._send(name, body[: fault.after_bytes])
                    if fault.kind == "stall":  # hold the connection open until the test ends
                        while not server._release.wait(0.05):
                            pass
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault is not None and fault.kind == "corrupt" and body:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                self._send(name, body)

            def _send(self, name, chunk):
                for i in range(0, len(chunk), 1 << 16):
                    self.wfile.write(chunk[i : i + (1 << 16)])
                    with server._lock:
                        server.sent[name] = server.sent.get(name, 0) + len(chunk[i : i + (1 << 16)])
                self.wfile.flush()

        return Handler


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``. A file or folder vanishing under the poll
    (a download's temporary folder walked while it is removed) counts as "not yet"."""

    def check() -> bool:
        try:
            return bool(predicate())
        except FileNotFoundError:
            return False

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(interval)
    return check()


def refused_url() -> str:
    """The URL of a loopback port nobody listens on: connection refused, as without network."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
