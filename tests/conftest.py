import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    from vlmtune.demo import build_dataset

    return build_dataset(tmp_path_factory.mktemp("ds") / "CLoT-Oogiri-GO", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from vlmtune.demo import build_model

    return build_model(tmp_path_factory.mktemp("model") / "InternVL2-tiny", seed=0)


@pytest.fixture(scope="session")
def configs():
    from vlmtune.config import load

    return load(ROOT / "config" / "config.yaml"), load(ROOT / "config" / "config.yaml", ROOT / "config" / "demo.yaml")
