"""Token bytes and token healing.

A prompt that ends in whitespace or inside a word ends on a token the model rarely saw in that
position: ``"QUESTION: "`` ends on GPT-2's lone space (id 220), while the training text has
``" What"``. Token healing backs off that trailing token and lets the first sampled token be any
token that starts with the removed text, so the model continues the prompt as it would have
tokenized it.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from lmtrain.data.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    byte_level_decoding,
)


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each id decodes to, indexed by id."""
    if isinstance(tokenizer, GPT2Tokenizer):
        enc = tokenizer.enc
        return [enc.decode_single_token_bytes(i) for i in range(tokenizer.vocab_size)]
    if isinstance(tokenizer, CharTokenizer):
        return [c.encode("utf-8", "surrogatepass") for c in tokenizer.chars]
    if isinstance(tokenizer, BPETokenizer):  # byte-level BPE; added tokens are plain text
        table = byte_level_decoding()
        out = []
        for i in range(tokenizer.vocab_size):
            piece = tokenizer.tok.id_to_token(i) or ""
            if all(c in table for c in piece):
                out.append(bytes(table[c] for c in piece))
            else:
                out.append(piece.encode("utf-8"))
        return out
    return [tokenizer.decode([i]).encode("utf-8") for i in range(tokenizer.vocab_size)]


@dataclass(frozen=True)
class HealedPrompt:
    """What the model is fed, and how its first sampled token is constrained."""

    context: list[int]
    #: the backed-off text the first sampled token must start with (``b""``: none)
    prefix: bytes = b""
    #: ids allowed as the first sampled token (``None``: any)
    allowed: list[int] | None = None


def heal_prompt(ids: list[int], table: list[bytes]) -> HealedPrompt:
    """Back off the prompt's last token when other tokens extend its text.

    Nothing changes for a single-token prompt (the model needs a context) or when no other
    token starts with the last token's text (a character vocabulary, or a complete word).
    """
    if len(ids) < 2:
        return HealedPrompt(list(ids))
    prefix = table[ids[-1]]
    allowed = [i for i, piece in enumerate(table) if piece.startswith(prefix)]
    if len(allowed) < 2:
        return HealedPrompt(list(ids))
    return HealedPrompt(list(ids[:-1]), prefix, allowed)


def stream_text(ids: Iterable[int], table: list[bytes], skip: bytes = b"") -> Iterator[str]:
    """Decode ``ids`` piece by piece, holding back bytes of a character not yet complete.

    ``skip`` is dropped from the front of the first token (the healed prefix, already shown as
    part of the prompt). The pieces join to what the tokenizer decodes at once.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i in ids:
        piece = table[i]
        if skip:
            piece, skip = piece[len(skip):], b""
        text = decoder.decode(piece)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
