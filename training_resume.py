"""Deprecated: resume a run. Use `CHECKPOINT_PATH=... python training.py` instead.

Kept for old workflows; it requires CHECKPOINT_PATH and runs exactly the same code as training.py.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from lmtrain.cli import env_entrypoint


def main() -> int:
    if not os.environ.get("CHECKPOINT_PATH", "").strip():
        print("error: CHECKPOINT_PATH is not set; training_resume.py only resumes — set "
              "CHECKPOINT_PATH=<checkpoint.pt> (or 'auto'), or use training.py for a fresh run",
              file=sys.stderr)
        return 2
    print("training_resume.py is deprecated: use `CHECKPOINT_PATH=... python training.py` "
          "(same settings, same code)", file=sys.stderr)
    return env_entrypoint()


if __name__ == "__main__":
    raise SystemExit(main())
