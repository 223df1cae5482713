"""The embedded demo's model: a tiny InternVL2 of a model-builder preset (random weights, the real
remote-code classes), its tokenizer trained on the demo's jokes and questions.

    python -m vlmtune.demo_model --out data/demo/InternVL2-tiny --preset tiny
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .demo import JOKES, QUESTIONS
from .model_builder import build


def build_model(out: Path, seed: int = 0, preset: str = "tiny") -> Path:
    """Write a tiny InternVL2 of ``preset`` to ``out`` (atomically): ``tiny`` (the 2B's
    InternLM2), ``tiny-4b`` (Phi-3), ``tiny-8b`` (InternLM2.5). The same seed gives the same
    files."""
    return build(out, preset, seed, corpus=JOKES + QUESTIONS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="tiny", help="the model builder's preset (tiny, tiny-4b, tiny-8b)")
    args = ap.parse_args(argv)
    print(f"built demo model at {build_model(args.out, args.seed, args.preset)}")


if __name__ == "__main__":
    main()
