"""Serving a trained model: batched decoding that requests join and leave (``batch``,
``engine``), and the OpenAI-compatible HTTP front end (``protocol``, ``app``)."""
