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
    assert (out / "images" / "demo011.jpg").read_bytes() == (demo_dataset / "images" / "demo011.jpg").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["extracted_from_zip"] == 13


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
