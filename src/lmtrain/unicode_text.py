"""Text that is not Unicode: a lone surrogate (``"\\ud800"`` in JSON, or the bytes of invalid
UTF-8 in an argument or an environment variable, which Python keeps as ``\\udcXX``) cannot be
encoded, tokenized or written. Every reader of text checks with :func:`unpaired_surrogate`."""

from __future__ import annotations


def unpaired_surrogate(text: str) -> int | None:
    """Where ``text`` holds a lone surrogate (not encodable as UTF-8), else ``None``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def not_text(text: str) -> str | None:
    """Why ``text`` is not text (a lone surrogate, named with its position), else ``None``."""
    bad = unpaired_surrogate(text)
    if bad is None:
        return None
    return (f"it holds an unpaired surrogate (U+{ord(text[bad]):04X} at character {bad}): "
            f"invalid UTF-8, not text")
