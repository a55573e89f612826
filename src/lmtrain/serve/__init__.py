"""Serving a trained model: batched decoding that requests join and leave (``batch``,
``engine``), and the OpenAI-compatible HTTP front end (``protocol``, ``app``)."""

#: Requests decoded together at most, by default (here, so that ``lmtrain --help`` imports no
#: torch).
MAX_BATCH = 64
