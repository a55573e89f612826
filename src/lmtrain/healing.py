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


class TextPieces:
    """Token ids in, text out, one token at a time: bytes of a character not yet complete are
    held back until it is. ``skip`` is dropped from the front of the first token (the healed
    prefix, already shown as part of the prompt)."""

    def __init__(self, table: list[bytes], skip: bytes = b"") -> None:
        self.table, self.skip = table, skip
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text that ``token`` completes (perhaps ``""``)."""
        piece = self.table[token]
        if self.skip:
            piece, self.skip = piece[len(self.skip):], b""
        return self.decoder.decode(piece)

    def end(self) -> str:
        """What is left once no token follows (an incomplete character, replaced)."""
        return self.decoder.decode(b"", final=True)


def stream_text(ids: Iterable[int], table: list[bytes], skip: bytes = b"") -> Iterator[str]:
    """Decode ``ids`` piece by piece (:class:`TextPieces`); the pieces join to what the
    tokenizer decodes at once."""
    pieces = TextPieces(table, skip)
    for i in ids:
        text = pieces.push(i)
        if text:
            yield text
    tail = pieces.end()
    if tail:
        yield tail
