"""Run XTuner's own training entry point (``xtuner.tools.train``) in this process, with the
two environment fixes it needs on current PyTorch (FIELD-NOTES §2):

- torch >= 2.6 loads checkpoints with ``weights_only=True``, which rejects XTuner/mmengine
  checkpoints on resume: force the old behaviour (checkpoints are our own files);
- mmengine's ``pytorch`` launcher calls ``torch.cuda.set_device`` even on CPU: make it a
  no-op where no GPU exists, so the same torchrun command trains on gloo.

Used by ``vlmtune.train`` as ``torchrun ... -m vlmtune.xtuner_main CONFIG --launcher pytorch``.
"""

import os
import runpy
import sys


def main() -> None:
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import torch

    if not torch.cuda.is_available():
        torch.cuda.set_device = lambda *args, **kwargs: None
    sys.argv = ["xtuner.tools.train", *sys.argv[1:]]
    runpy.run_module("xtuner.tools.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
