"""Text that is not Unicode: a lone surrogate (``"\\ud800"`` in JSON, or the bytes of invalid
UTF-8 in an argument or an environment variable, which Python keeps as ``\\udcXX``) cannot be
encoded, tokenized or written. Every reader of text checks with :func:`unpaired_surrogate`
(the words its message uses: :func:`surrogate_problem`)."""

from __future__ import annotations


def unpaired_surrogate(text: str) -> int | None:
    """Where ``text`` holds a lone surrogate (not encodable as UTF-8), else ``None``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def surrogate_problem(text: str) -> str | None:
    """``"holds an unpaired surrogate (U+XXXX at character N)"`` for ``text`` that holds one
    (the words every reader's message uses), else ``None``."""
    bad = unpaired_surrogate(text)
    if bad is None:
        return None
    return f"holds an unpaired surrogate (U+{ord(text[bad]):04X} at character {bad})"


def not_text(text: str) -> str | None:
    """Why ``text`` is not text (a lone surrogate, named with its position), else ``None``."""
    problem = surrogate_problem(text)
    return None if problem is None else f"it {problem}: invalid UTF-8, not text"
