"""Test helper for tests/test_code_hash.py, not part of the package.

A Python process started with this folder on PYTHONPATH and VLMTUNE_TRACE_MODULES set records
every ``vlmtune`` module it looks up (imports, and ``python -m`` / runpy runs, which never enter
``sys.modules`` under their own name), and at exit writes them, with its pid, parent pid and
where its stderr goes (a rule's log file), to ``$VLMTUNE_TRACE_MODULES/<pid>.json``.
"""

import atexit
import json
import os
import sys

_TRACE_DIR = os.environ.get("VLMTUNE_TRACE_MODULES")

if _TRACE_DIR:
    _seen = set()

    class _Recorder:
        """A meta-path finder that only takes notes and lets the real finders do the work."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.startswith("vlmtune."):
                _seen.add(name.split(".")[1])
            return None

    sys.meta_path.insert(0, _Recorder)

    def _dump():
        try:
            stderr = os.readlink("/proc/self/fd/2")
        except OSError:
            stderr = None
        record = dict(
            pid=os.getpid(), ppid=os.getppid(), stderr=stderr, argv=sys.argv[:4], modules=sorted(_seen)
        )
        with open(os.path.join(_TRACE_DIR, f"{os.getpid()}.json"), "w") as fh:
            json.dump(record, fh)

    atexit.register(_dump)
