"""lmtrain: train small GPT-style language models, fresh or resumed, through one entrypoint."""

__version__ = "0.1.0"
