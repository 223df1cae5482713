"""ModelScope downloads against a loopback server speaking the ModelScope hub API
(tests/modelscope_server.py) with the real ``modelscope`` client's API calls, as tests/test_fetch.py
does for the Hugging Face hub: download, pinning to a revision, hash checks, an interrupted
download, 404s and no network."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hub_server import refused_url
from modelscope_server import ModelScopeServer, MsRepo, wait_for
from vlmtune.fetch import FetchError, RetryPolicy, fetch, sha256

MODEL_ID, DATASET_ID = "OpenGVLab/InternVL2-2B", "zhongshsh/CLoT-Oogiri-GO"
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)
SLOW = RetryPolicy(attempts=5, base_delay=30)  # a retry would show up as a 30 s stall


def model_files(tag: bytes = b"") -> dict[str, bytes]:
    big = hashlib.sha256(b"seed" + tag).digest() * (3 * 1024 * 1024 // 32 + 7)  # 3 MiB + 224 B
    return {
        "config.json": b'{"model_type": "internvl_chat"%s}\n' % tag,
        "model.safetensors": big,
        "tokenizer.model": b"tok" * 1000,
    }


@pytest.fixture
def ms(monkeypatch, demo_dataset, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for jpg in sorted((demo_dataset / "images").iterdir()):
            zf.write(jpg, f"images/{jpg.name}")
    dataset = {
        "cn.jsonl": (demo_dataset / "cn.jsonl").read_bytes(),
        "en.jsonl": b'{"text": "x"}\n',
        "images.zip": buf.getvalue(),
        "README.md": b"# CLoT\n",
    }
    repos = {
        ("model", MODEL_ID): MsRepo(
            {"master": model_files(), "v1.0": model_files(b', "old": 1')}, tags={"v1.0"}
        ),
        ("dataset", DATASET_ID): MsRepo({"master": dataset}),
        ("model", "OpenGVLab/NoHashes"): MsRepo({"master": model_files()}, sha256=False),
    }
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.modelscope credentials of the machine
    with ModelScopeServer(repos) as server:
        monkeypatch.setenv("MODELSCOPE_DOMAIN", server.url)
        server.cache = tmp_path / "ms-cache"
        yield server


def get(kind, out, repo_id=MODEL_ID, revision="master", policy=FAST, ms=None, **kw):
    return fetch(
        kind,
        "modelscope",
        out,
        repo_id=repo_id,
        revision=revision,
        policy=policy,
        cache_dir=str(ms.cache),
        **kw,
    )


def test_model_download_is_verified_against_the_listed_sha256(ms, tmp_path):
    out = get("model", tmp_path / "m", ms=ms)
    m = json.loads((out / "manifest.json").read_text())
    for name, data in model_files().items():
        assert (out / name).read_bytes() == data
        assert m["files"][name] == {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "hub_check": "modelscope_sha256",
        }
    assert m["source"] == "modelscope" and m["revision"] == "master" and m["hub_checked_files"] == 3
    assert m["commit"] == ms.repos[("model", MODEL_ID)].commit("master") and m["endpoint"] == ms.url
    again = get("model", tmp_path / "m", ms=ms)  # a rerun downloads nothing: the blobs are cached
    assert json.loads((again / "manifest.json").read_text()) == m
    assert len(ms.requested("GET", "model.safetensors")) == 1


def test_dataset_download_fetches_only_what_the_run_needs_and_extracts(ms, demo_dataset, tmp_path):
    out = get("dataset", tmp_path / "ds", repo_id=DATASET_ID, language="cn", ms=ms)
    m = json.loads((out / "manifest.json").read_text())
    assert m["files"]["cn.jsonl"]["sha256"] == sha256(demo_dataset / "cn.jsonl")
    assert m["files"]["images.zip"]["hub_check"] == "modelscope_sha256"
    assert m["extracted_from_zip"] == 13 and (out / "images" / "demo005.jpg").is_file()
    assert "en.jsonl" not in m["files"] and not ms.requested(suffix="en.jsonl")
    assert ms.requested("GET", "/api/v1/datasets/4242/repo/tree")  # the client's paged listing


def test_pinned_to_a_tag(ms, tmp_path):
    out = get("model", tmp_path / "m", revision="v1.0", ms=ms)
    assert (out / "config.json").read_bytes() == model_files(b', "old": 1')["config.json"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["revision"] == "v1.0" and m["commit"] == ms.repos[("model", MODEL_ID)].commit("v1.0")
    assert m["files"]["model.safetensors"]["sha256"] != sha256(tmp_path / "m" / "config.json")
    master = get("model", tmp_path / "m2", ms=ms)
    assert (master / "config.json").read_bytes() == model_files()["config.json"]


def test_corrupted_download_is_detected_and_refetched(ms, tmp_path, capsys):
    ms.fault(path_suffix="tokenizer.model", kind="corrupt")
    out = get("model", tmp_path / "m", ms=ms)
    assert len(ms.requested("GET", "tokenizer.model")) == 2
    assert (out / "tokenizer.model").read_bytes() == model_files()["tokenizer.model"]
    assert "differs from ModelScope's" in capsys.readouterr().out


def test_a_listing_without_hashes_is_recorded_as_unchecked(ms, tmp_path):
    out = get("model", tmp_path / "m", repo_id="OpenGVLab/NoHashes", ms=ms)
    m = json.loads((out / "manifest.json").read_text())
    assert m["hub_checked_files"] == 0 and m["files"]["config.json"]["hub_check"] is None
    assert m["files"]["config.json"]["sha256"] == hashlib.sha256(model_files()["config.json"]).hexdigest()


def test_connection_dropped_mid_file_is_retried_with_range(ms, tmp_path):
    ms.fault(path_suffix="model.safetensors", kind="drop", after_bytes=1024 * 1024 + 4096)
    out = get("model", tmp_path / "m", ms=ms)
    ranges = [rng for _, _, rng in ms.requested("GET", "model.safetensors")]
    assert ranges[0] is None and len(ranges) == 2 and int(ranges[1][6:-1]) > 0
    assert sha256(out / "model.safetensors") == hashlib.sha256(model_files()["model.safetensors"]).hexdigest()


def test_interrupted_download_resumes_without_refetching(ms, tmp_path):
    """A fetch process killed mid-file leaves the finished files and the partial one in the
    cache; the rerun asks only for the rest of the partial file."""
    ms.fault(path_suffix="model.safetensors", kind="stall", after_bytes=2 * 1024 * 1024)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
        "MODELSCOPE_CACHE": str(ms.cache),
    }
    out = tmp_path / "model"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vlmtune.fetch",
            "model",
            "--source",
            "modelscope",
            "--repo-id",
            MODEL_ID,
            "--revision",
            "master",
            "--out",
            str(out),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = lambda: list(ms.cache.rglob("*.incomplete"))
    try:
        assert wait_for(lambda: partial() and partial()[0].stat().st_size >= 2 * 1024 * 1024, timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    kept = partial()[0].stat().st_size
    assert 0 < kept < len(model_files()["model.safetensors"]) and not out.exists()
    first_run = len(ms.requests)
    assert ms.requested("GET", "config.json")

    get("model", out, ms=ms)
    gets = [
        (p.rsplit("/", 1)[1], rng)
        for method, p, rng in ms.requests[first_run:]
        if "/repo/" in p and not p.endswith("/repo/files")
    ]
    assert gets == [("model.safetensors", f"bytes={kept}-"), ("tokenizer.model", None)]
    for name, data in model_files().items():
        assert sha256(out / name) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "kind, repo_id, revision, why",
    [
        ("model", "OpenGVLab/NoSuchModel", "master", "repository not found"),
        ("model", MODEL_ID, "v9.9", "revision not found"),
        ("model", MODEL_ID, "main", "revision not found"),  # the hub's default, not ModelScope's
        ("dataset", "zhongshsh/NoSuchData", "master", "repository not found"),
        ("dataset", DATASET_ID, "v9.9", "revision not found"),
    ],
)
def test_permanent_404_fails_at_once_naming_repo_and_revision(ms, tmp_path, kind, repo_id, revision, why):
    with pytest.raises(FetchError) as err:
        get(kind, tmp_path / "x", repo_id=repo_id, revision=revision, policy=SLOW, ms=ms, language="cn")
    msg = str(err.value)
    assert f"{repo_id}@{revision}" in msg and why in msg and "gave up" not in msg and ms.url in msg
    assert "MODELSCOPE_DOMAIN" in msg and "source: local" in msg
    if "revision" in why:
        assert "default branch is master" in msg
    assert not (tmp_path / "x").exists()


def test_a_listed_file_that_404s_fails_at_once_naming_it(ms, tmp_path):
    ms.fault(path_suffix="tokenizer.model", kind="status", status=404, times=5)
    with pytest.raises(FetchError, match=r"HTTP 404") as err:
        get("model", tmp_path / "m", policy=SLOW, ms=ms)
    assert "tokenizer.model" in str(err.value) and len(ms.requested("GET", "tokenizer.model")) == 1
    assert not (tmp_path / "m").exists()


def test_no_network_fails_at_once(ms, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_DOMAIN", refused_url())
    with pytest.raises(FetchError) as err:
        get("model", tmp_path / "m", policy=SLOW, ms=ms)
    assert "cannot connect" in str(err.value) and "MODELSCOPE_DOMAIN" in str(err.value)
