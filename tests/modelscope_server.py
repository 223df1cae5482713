"""A loopback HTTP server speaking the ModelScope hub API that the real ``modelscope`` client
(1.21.0, ``HubApi``) and ``vlmtune.fetch`` use, with ``MODELSCOPE_DOMAIN`` pointing here:

models
- ``GET /api/v1/models/{owner}/{name}/revisions``: ``RevisionMap`` of branches and tags
  (``get_valid_revision_detail``); an unknown repository answers HTTP 404;
- ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=``: the file list, each
  file with ``Path``, ``Size``, ``Sha256`` and ``Revision`` (the commit);
- ``GET /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=``: the file, ``Range`` / 206;

datasets
- ``GET /api/v1/datasets/{owner}/{name}``: the dataset's numeric id (``Code`` 404 when unknown);
- ``GET /api/v1/datasets/{id}/repo/tree?Revision=&PageNumber=&PageSize=``: the paged file list;
- ``GET /api/v1/datasets/{owner}/{name}/repo?Source=SDK&Revision=&FilePath=``: the file.

Every revision of a repository is its own set of files (so pinning is observable). Faults and
the request log are tests/hub_server.py's: a file download is logged and matched as
``<path>/<FilePath>`` (e.g. ``.../repo/model.safetensors``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from hub_server import Fault, HubServer, wait_for  # noqa: F401 (wait_for: for the tests)


@dataclass
class MsRepo:
    revisions: dict[str, dict[str, bytes]]  # branch or tag -> {path: bytes}
    tags: set[str] = field(default_factory=set)  # the other revisions are branches
    sha256: bool = True  # whether the file list gives each file's Sha256
    dataset_id: int = 4242

    def commit(self, rev: str) -> str:
        return hashlib.sha1(f"commit of {rev}".encode()).hexdigest()

    def files(self, rev: str) -> list[dict]:
        out = []
        for path, data in sorted(self.revisions[rev].items()):
            entry = {
                "Name": path.rsplit("/", 1)[-1],
                "Path": path,
                "Type": "blob",
                "Size": len(data),
                "Revision": self.commit(rev),
            }
            if self.sha256:
                entry["Sha256"] = hashlib.sha256(data).hexdigest()
            out.append(entry)
        return out


class ModelScopeServer(HubServer):
    def __init__(self, repos: dict[tuple[str, str], MsRepo]):
        super().__init__(repos)

    def _handler(self):
        server = self

        class Handler(super()._handler()):
            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _missing(self, what: str, status=404):
                self._json({"Code": 404, "Message": f"{what} not found", "RequestId": "loopback"}, status)

            def _serve(self, method: str):
                url = urlsplit(self.path)
                path, query = unquote(url.path), {k: v[0] for k, v in parse_qs(url.query).items()}
                key = f"{path}/{query['FilePath']}" if "FilePath" in query else path
                server.requests.append((method, key, self.headers.get("Range")))
                fault = server._take_fault(method, key)
                if fault is not None and fault.kind == "status":
                    return self._error(fault.status)
                parts = path.strip("/").split("/")
                if parts[:3] == ["api", "v1", "models"] and len(parts) >= 5:
                    return self._model(method, ("model", f"{parts[3]}/{parts[4]}"), parts[5:], query, fault)
                if parts[:3] == ["api", "v1", "datasets"]:
                    return self._dataset(method, parts[3:], query, fault)
                return self._error(404)

            def _model(self, method, repo_key, rest, query, fault):
                repo = server.repos.get(repo_key)
                if repo is None:
                    return self._missing(f"model {repo_key[1]}")
                if rest == ["revisions"]:
                    entry = lambda r: {"Revision": r, "CreatedAt": 1700000000}
                    return self._json(
                        {
                            "Code": 200,
                            "Data": {
                                "RevisionMap": {
                                    "Branches": [
                                        entry(r) for r in sorted(repo.revisions) if r not in repo.tags
                                    ],
                                    "Tags": [entry(r) for r in sorted(repo.tags)],
                                }
                            },
                        }
                    )
                rev = query.get("Revision", "master")
                if rev not in repo.revisions:
                    return self._missing(f"revision {rev}", status=200)
                if rest == ["repo", "files"]:
                    return self._json({"Code": 200, "Data": {"Files": repo.files(rev)}})
                if rest == ["repo"]:
                    return self._blob(method, repo, rev, query.get("FilePath", ""), fault)
                return self._error(404)

            def _dataset(self, method, rest, query, fault):
                by_id = {str(r.dataset_id): r for (kind, _), r in server.repos.items() if kind == "dataset"}
                if len(rest) == 2:  # {owner}/{name}: the id
                    repo = server.repos.get(("dataset", "/".join(rest)))
                    if repo is None:
                        return self._missing(f"dataset {'/'.join(rest)}")
                    return self._json({"Code": 200, "Data": {"Id": repo.dataset_id, "Type": 0}})
                if rest[1:] == ["repo", "tree"] and rest[0] in by_id:
                    repo, rev = by_id[rest[0]], query.get("Revision", "master")
                    if rev not in repo.revisions:
                        return self._missing(f"revision {rev}", status=200)
                    page, size = int(query.get("PageNumber", 1)), int(query.get("PageSize", 100))
                    files = repo.files(rev)[(page - 1) * size : page * size]
                    return self._json({"Code": 200, "Data": {"Files": files}})
                repo = server.repos.get(("dataset", "/".join(rest[:2])))
                if rest[2:] == ["repo"] and repo is not None:
                    rev = query.get("Revision", "master")
                    if rev not in repo.revisions:
                        return self._missing(f"revision {rev}")
                    return self._blob(method, repo, rev, query.get("FilePath", ""), fault)
                return self._missing("/".join(rest))

            def _blob(self, method, repo, rev, name, fault):
                data = repo.revisions[rev].get(name)
                if data is None:
                    return self._missing(f"file {name}")
                rng = self.headers.get("Range")
                start = int(rng[6:].split("-")[0]) if rng and rng.startswith("bytes=") else 0
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return self._deliver(method, name, body, fault)

        return Handler
