"""Train a model, fresh or resumed, from environment variables.

    TRAINING_STEPS=500 python training.py
    CHECKPOINT_PATH=checkpoints/<run>/step_0000200.pt RESUME_STEPS=300 python training.py

Every setting is documented in `lmtrain train --help` and docs/settings.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from lmtrain.cli import env_entrypoint

if __name__ == "__main__":
    raise SystemExit(env_entrypoint())
