"""Serving a trained model: batched decoding that requests join and leave (``engine``, over
:mod:`lmtrain.padded_batch`), and the OpenAI-compatible HTTP front end (``protocol``, ``app``,
``server``)."""

#: Requests decoded together at most, by default (here, so that ``lmtrain --help`` imports no
#: torch).
MAX_BATCH = 64
