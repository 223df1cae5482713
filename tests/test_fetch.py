import json
import shutil
import stat
import zipfile

import pytest

from vlmtune.fetch import FetchError, fetch, safe_extract, sha256


def test_local_dataset_fetch_writes_manifest(demo_dataset, tmp_path):
    out = fetch("dataset", "local", tmp_path / "out", path=str(demo_dataset), language="cn")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "local"
    assert manifest["files"]["cn.jsonl"]["sha256"] == sha256(demo_dataset / "cn.jsonl")
    assert (out / "images" / "demo000.jpg").is_file()
    assert len([f for f in manifest["files"] if f.startswith("images/")]) == 13


def test_dataset_zip_is_extracted(demo_dataset, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(demo_dataset / "cn.jsonl", src / "cn.jsonl")
    with zipfile.ZipFile(src / "images.zip", "w") as zf:
        for jpg in sorted((demo_dataset / "images").iterdir()):
            zf.write(jpg, f"images/{jpg.name}")
    out = fetch("dataset", "local", tmp_path / "out", path=str(src), language="cn")
    assert (out / "images" / "demo011.jpg").read_bytes() == (
        demo_dataset / "images" / "demo011.jpg"
    ).read_bytes()
    first = json.loads((out / "manifest.json").read_text())
    assert first["extracted_from_zip"] == 13
    again = fetch("dataset", "local", tmp_path / "out", path=str(src), language="cn")  # idempotent
    assert json.loads((again / "manifest.json").read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary folders left


def test_missing_language_file_is_named(demo_dataset, tmp_path):
    with pytest.raises(FetchError, match="no en.jsonl"):
        fetch("dataset", "local", tmp_path / "out", path=str(demo_dataset), language="en")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "images/../../evil.txt"])
def test_hostile_zip_entries_are_refused(tmp_path, name):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images/ok.jpg", b"x")
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    with pytest.raises(FetchError, match="refusing"):
        safe_extract(archive, dest)
    assert not list(tmp_path.rglob("evil.txt")) and not list(dest.iterdir())


def test_zip_symlink_is_refused(tmp_path):
    archive = tmp_path / "images.zip"
    info = zipfile.ZipInfo("images/link.jpg")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(FetchError, match="link"):
        safe_extract(archive, tmp_path / "dest")


def test_offline_hub_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError) as err:
        fetch("model", "huggingface", tmp_path / "m", repo_id="OpenGVLab/InternVL2-2B", revision="main")
    msg = str(err.value)
    assert "OpenGVLab/InternVL2-2B@main" in msg and "HF_ENDPOINT" in msg and "source: local" in msg


# --- Hub downloads against a loopback server speaking the hub's file protocol (tests/hub_server.py)
# with the real huggingface_hub client. conftest.py sets HF_HUB_OFFLINE=1; the `hub` fixture turns
# it off for one test (the client reads it at import, so its constant and sessions are reset too).

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from hub_server import HubServer, Repo, refused_url, wait_for
from vlmtune.fetch import RetryPolicy

MODEL_ID, DATASET_ID = "OpenGVLab/InternVL2-2B", "zhongshsh/CLoT-Oogiri-GO"
CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: bytes reach the disk in these
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


def model_files() -> dict[str, bytes]:
    big = hashlib.sha256(b"seed").digest() * (24 * 1024 * 1024 // 32 + 7)  # 24 MiB + 224 B
    return {
        "config.json": b'{"model_type": "internvl_chat"}\n',
        "generation_config.json": b"{}\n",
        "model.safetensors": big,
        "tokenizer.model": b"tok" * 1000,
    }


@pytest.fixture
def hub(monkeypatch, demo_dataset, tmp_path):
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    buf = __import__("io").BytesIO()
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
        ("model", MODEL_ID): Repo(model_files(), lfs={"model.safetensors"}),
        ("dataset", DATASET_ID): Repo(dataset, commit="d" * 40, lfs={"images.zip"}),
    }
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reset_sessions()
    with HubServer(repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.cache = tmp_path / "hub-cache"
        yield server
    reset_sessions()


def test_hub_dataset_download_is_verified_and_pinned(hub, demo_dataset, tmp_path):
    out = fetch(
        "dataset",
        "huggingface",
        tmp_path / "ds",
        repo_id=DATASET_ID,
        revision="main",
        language="cn",
        policy=FAST,
        cache_dir=str(hub.cache),
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["revision"] == "main" and m["commit"] == "d" * 40
    assert m["files"]["cn.jsonl"]["sha256"] == sha256(demo_dataset / "cn.jsonl")
    assert m["files"]["cn.jsonl"]["hub_check"] == "git_blob_sha1"
    assert m["files"]["images.zip"]["hub_check"] == "lfs_sha256" and m["hub_checked_files"] == 3
    assert m["extracted_from_zip"] == 13 and (out / "images" / "demo005.jpg").is_file()
    assert "en.jsonl" not in m["files"] and not hub.requested(suffix="en.jsonl")  # only what is needed
    assert "HF_TOKEN" not in json.dumps(m)


def test_interrupted_download_resumes_without_refetching(hub, tmp_path):
    """A fetch process killed mid-file (as when a Slurm job hits its time limit) leaves the
    completed files and the partial one in the hub cache; the rerun asks only for the rest."""
    hub.fault(path_suffix="model.safetensors", kind="stall", after_bytes=CHUNK + CHUNK // 2)
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(hub.cache),
        "HF_HUB_OFFLINE": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    out = tmp_path / "model"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vlmtune.fetch",
            "model",
            "--source",
            "huggingface",
            "--repo-id",
            MODEL_ID,
            "--out",
            str(out),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = lambda: list(hub.cache.rglob("*.incomplete"))
    try:
        assert wait_for(lambda: partial() and partial()[0].stat().st_size >= CHUNK, timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    kept = partial()[0].stat().st_size
    assert 0 < kept < len(model_files()["model.safetensors"]) and not out.exists()
    first_run = len(hub.requests)
    assert hub.requested("GET", "config.json") and hub.requested("GET", "generation_config.json")

    fetch(
        "model", "huggingface", out, repo_id=MODEL_ID, revision="main", policy=FAST, cache_dir=str(hub.cache)
    )
    rerun = hub.requests[first_run:]
    gets = [
        (path.rsplit("/", 1)[1], rng)
        for method, path, rng in rerun
        if method == "GET" and "/resolve/" in path
    ]
    # (a) the partial file continues where the killed process left it; (b) finished files are not fetched.
    assert gets == [("model.safetensors", f"bytes={kept}-"), ("tokenizer.model", None)]
    m = json.loads((out / "manifest.json").read_text())
    for name, data in model_files().items():
        assert m["files"][name]["sha256"] == hashlib.sha256(data).hexdigest() == sha256(out / name)
    assert m["commit"] == hub.repos[("model", MODEL_ID)].commit


def test_connection_dropped_mid_file_is_retried_with_range(hub, tmp_path, capsys):
    hub.fault(path_suffix="model.safetensors", kind="drop", after_bytes=CHUNK + 4096)
    out = fetch(
        "model",
        "huggingface",
        tmp_path / "m",
        repo_id=MODEL_ID,
        revision="main",
        policy=FAST,
        cache_dir=str(hub.cache),
    )
    ranges = [rng for _, _, rng in hub.requested("GET", "model.safetensors")]
    assert ranges[0] is None and ranges[1] == f"bytes={CHUNK}-" and len(ranges) == 2
    assert sha256(out / "model.safetensors") == hashlib.sha256(model_files()["model.safetensors"]).hexdigest()
    assert "retrying in" in capsys.readouterr().out


def test_transient_503_is_retried_then_succeeds(hub, tmp_path, capsys):
    hub.fault(path_suffix="/revision/main", kind="status", status=503, times=2)
    hub.fault(path_suffix="/config.json", kind="status", status=502, times=1, methods=("HEAD",))
    out = fetch(
        "model",
        "huggingface",
        tmp_path / "m",
        repo_id=MODEL_ID,
        revision="main",
        policy=FAST,
        cache_dir=str(hub.cache),
    )
    assert len(hub.requested("GET", "/revision/main")) == 3
    assert len(hub.requested("HEAD", "/config.json")) == 2
    assert (out / "config.json").read_bytes() == model_files()["config.json"]
    log = capsys.readouterr().out
    assert "HTTP 503; retrying" in log and "HTTP 502; retrying" in log


@pytest.mark.parametrize(
    "repo_id, revision, why",
    [
        ("OpenGVLab/NoSuchModel", "main", "repository not found"),
        (MODEL_ID, "v9.9", "revision not found"),
    ],
)
def test_permanent_404_fails_at_once_naming_repo_and_revision(hub, tmp_path, repo_id, revision, why):
    slow = RetryPolicy(attempts=5, base_delay=30)  # a retry would show up as a 30 s stall
    with pytest.raises(FetchError) as err:
        fetch(
            "model",
            "huggingface",
            tmp_path / "m",
            repo_id=repo_id,
            revision=revision,
            policy=slow,
            cache_dir=str(hub.cache),
        )
    msg = str(err.value)
    assert f"{repo_id}@{revision}" in msg and why in msg and "gave up" not in msg
    assert len(hub.requests) == 1 and not (tmp_path / "m").exists()


def test_corrupted_download_is_detected_and_refetched(hub, tmp_path, capsys):
    hub.fault(path_suffix="tokenizer.model", kind="corrupt")
    out = fetch(
        "model",
        "huggingface",
        tmp_path / "m",
        repo_id=MODEL_ID,
        revision="main",
        policy=FAST,
        cache_dir=str(hub.cache),
    )
    assert len(hub.requested("GET", "tokenizer.model")) == 2
    assert (out / "tokenizer.model").read_bytes() == model_files()["tokenizer.model"]
    assert "differs from the hub's" in capsys.readouterr().out


def test_no_network_fails_at_once(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", refused_url())
    with pytest.raises(FetchError) as err:
        fetch(
            "model",
            "huggingface",
            tmp_path / "m",
            repo_id=MODEL_ID,
            revision="main",
            policy=RetryPolicy(attempts=5, base_delay=30),
            cache_dir=str(hub.cache),
        )
    assert "cannot connect" in str(err.value) and "HF_ENDPOINT" in str(err.value)


def test_download_progress_reaches_the_log(hub, capsys):
    from vlmtune.fetch import from_huggingface

    hub.fault(path_suffix="model.safetensors", kind="drop", after_bytes=CHUNK + 1)  # slow it: one retry
    from_huggingface("model", MODEL_ID, "main", None, FAST, str(hub.cache), progress_interval=0.01)
    log = capsys.readouterr().out
    assert "[3/4] model.safetensors (25.2 MB)" in log
    assert "model.safetensors: resuming from 10.5/25.2 MB" in log  # the retry continues the partial file


def test_credentials_in_a_mirror_url_are_dropped_from_what_is_recorded(monkeypatch):
    from vlmtune.fetch import public_endpoint

    monkeypatch.setenv("HF_ENDPOINT", "https://alice:hf_SECRETtoken@mirror.example.org:8443/hf")
    assert public_endpoint() == "https://mirror.example.org:8443/hf"
    monkeypatch.delenv("HF_ENDPOINT")
    assert public_endpoint() == "https://huggingface.co"


# --- Extraction limits: a zip bomb stops the fetch naming the entry and the limit, before it
# writes past the cap; a genuine archive (JPEGs barely compress) passes the defaults.

from vlmtune.fetch import ExtractLimits


def bomb(path, entries: dict[str, int]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, size in entries.items():
            zf.writestr(name, b"\0" * size)


def test_a_high_ratio_entry_is_refused_before_extraction(tmp_path):
    bomb(tmp_path / "images.zip", {"images/a.jpg": 1000, "images/bomb.jpg": 64 * 2**20})
    with pytest.raises(
        FetchError, match=r"'images/bomb.jpg' unpacks 67,108,864 bytes .*extraction.max_ratio"
    ):
        safe_extract(tmp_path / "images.zip", tmp_path / "dest")
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").rglob("*.jpg"))


def test_the_total_size_cap_names_the_entry_that_crosses_it(tmp_path):
    bomb(tmp_path / "images.zip", {f"images/{i}.jpg": 2**20 for i in range(4)})
    limits = ExtractLimits(max_bytes=3 * 2**20 + 10, max_ratio=10**6)
    with pytest.raises(
        FetchError,
        match=r"'images/3.jpg' takes the unpacked size to 4,194,304 bytes, over the "
        r"limit of 3,145,738 \(extraction.max_bytes\)",
    ):
        safe_extract(tmp_path / "images.zip", tmp_path / "dest", limits)
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").rglob("*.jpg"))


def test_a_lying_header_is_stopped_while_inflating(tmp_path):
    """Declared sizes can lie (here: 1 KiB declared, 8 MiB of data): the fetch fails without
    writing past the cap (the inflated bytes are also counted while writing)."""
    bomb(tmp_path / "images.zip", {"images/liar.jpg": 8 * 2**20})
    raw = bytearray((tmp_path / "images.zip").read_bytes())
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size in both headers
        at = raw.index(sig) + off
        raw[at : at + 4] = (1024).to_bytes(4, "little")
    (tmp_path / "images.zip").write_bytes(bytes(raw))
    limits = ExtractLimits(max_bytes=2 * 2**20, max_ratio=10**6)
    with pytest.raises(FetchError) as err:
        safe_extract(tmp_path / "images.zip", tmp_path / "dest", limits)
    written = sum(p.stat().st_size for p in (tmp_path / "dest").rglob("*") if p.is_file())
    # zipfile itself reads no more than the declared size and then fails the CRC: nothing past the cap.
    assert written <= 2 * 2**20 and "images.zip" in str(err.value)


def test_a_zip_bomb_stops_the_fetch_cli_and_leaves_no_output(demo_dataset, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(demo_dataset / "cn.jsonl", src / "cn.jsonl")
    bomb(src / "images.zip", {"images/demo000.jpg": 32 * 2**20})
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmtune.fetch",
            "dataset",
            "--source",
            "local",
            "--path",
            str(src),
            "--out",
            str(tmp_path / "out"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "images/demo000.jpg" in run.stderr and "extraction.max_ratio" in run.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmtune.fetch",
            "dataset",
            "--source",
            "local",
            "--path",
            str(src),
            "--max-extract-ratio",
            "2000",
            "--out",
            str(tmp_path / "out"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and (tmp_path / "out" / "images" / "demo000.jpg").stat().st_size == 32 * 2**20


def test_real_images_pass_the_default_limits(demo_dataset, tmp_path):
    with zipfile.ZipFile(tmp_path / "images.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for jpg in sorted((demo_dataset / "images").iterdir()):
            zf.write(jpg, f"images/{jpg.name}")
    assert safe_extract(tmp_path / "images.zip", tmp_path / "dest") == 13
