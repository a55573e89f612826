"""Pretrained GPT-2 through ``transformers``: found offline, checked against the run's settings.

``GPT2_MODEL_NAME`` is a folder in ``save_pretrained`` layout or a hub id resolved from the
local Hugging Face cache; nothing downloads unless ``ALLOW_DOWNLOAD=1``. The tokenizer is the
folder's own ``vocab.json`` + ``merges.txt`` when it has them, else the shipped GPT-2 BPE.
The model's shape (``N_LAYER``/``N_HEAD``/``N_EMBD``) is the folder's (:func:`gpt2_shape`): the
run's plan records it, and refuses an explicit different setting.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtrain.config import GPT2_SHAPE_FIELDS, DataSettings, ModelSettings
from lmtrain.errors import UserError

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmtrain.data.tokenizers import Tokenizer


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info logs while loading."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _not_found(config: ModelSettings, detail: str) -> UserError:
    name = config.gpt2_model_name
    return UserError(
        f"GPT2_MODEL_NAME={name!r}: no GPT-2 model found ({detail}); give a folder written by "
        f"save_pretrained (config.json + model.safetensors), or a hub id such as 'gpt2' that is in "
        f"the local Hugging Face cache (set ALLOW_DOWNLOAD=1 to download it once)")


def _why_missing(config: ModelSettings, exc: BaseException) -> str:
    path = Path(config.gpt2_model_name).expanduser()
    if path.is_dir():
        return "the folder has no config.json" if not (path / "config.json").is_file() else (
            _first_line(exc))
    if path.exists() or path.is_absolute() or config.gpt2_model_name.startswith((".", "~")):
        return "no such folder"
    if not config.allow_download:
        return "not a folder, and not in the local Hugging Face cache"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def gpt2_config(config: ModelSettings) -> GPT2Config:
    """The model's ``GPT2Config``, checked against ``BLOCK_SIZE``."""
    from transformers import GPT2Config

    try:
        with quiet_transformers():
            hf_config = GPT2Config.from_pretrained(
                config.gpt2_model_name, local_files_only=not config.allow_download)
    except (OSError, ValueError) as exc:
        raise _not_found(config, _why_missing(config, exc)) from None
    if hf_config.model_type != "gpt2":
        raise UserError(f"GPT2_MODEL_NAME={config.gpt2_model_name!r} is a "
                        f"{hf_config.model_type!r} model, not GPT-2; MODEL_TYPE=gpt2 needs GPT-2")
    check_block_size(config.block_size, hf_config.n_positions)
    return hf_config


def gpt2_shape(config: ModelSettings) -> dict[str, int]:
    """The real shape of the model ``GPT2_MODEL_NAME`` names (a fact the plan records): its
    ``n_layer``, ``n_head`` and ``n_embd``, read from the folder's config."""
    hf_config = gpt2_config(config)
    return {name: int(getattr(hf_config, name)) for name in GPT2_SHAPE_FIELDS}


def model_positions(model: Any) -> int | None:
    """A Hugging Face model's context limit (``n_positions``), or None for other models."""
    return getattr(getattr(model, "config", None), "n_positions", None)


def hub_snapshot(folder: str | Path) -> tuple[str, str] | None:
    """``(repo_id, commit)`` when ``folder`` is a snapshot in a Hugging Face cache
    (``.../models--ORG--NAME/snapshots/COMMIT``), else None."""
    path = Path(folder).expanduser().resolve()
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo.removeprefix("models--").replace("--", "/"), path.name


def locate(name: str, allow_download: bool = False) -> dict[str, str]:
    """Where ``GPT2_MODEL_NAME`` points now: ``{"resolved", "revision"}``: a folder's absolute
    path (revision ""), or a hub id and the commit of its cached snapshot (also when the name is
    that snapshot's folder, as a resumed adapter finds its base: the record stays portable)."""
    path = Path(name).expanduser()
    if path.is_dir():
        hub = hub_snapshot(path)
        if hub is not None:
            return {"resolved": hub[0], "revision": hub[1]}
        return {"resolved": str(path.resolve()), "revision": ""}
    from transformers.utils import cached_file

    try:
        found = Path(str(cached_file(name, "config.json", local_files_only=not allow_download)))
    except (OSError, ValueError):
        return {"resolved": name, "revision": ""}
    snapshot = found.parent
    return {"resolved": name,
            "revision": snapshot.name if snapshot.parent.name == "snapshots" else ""}


def snapshot_folder(repo_id: str, revision: str) -> str | None:
    """The local folder of a hub model at ``revision`` in the Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def check_block_size(block_size: int, n_positions: int) -> None:
    """A clear error when ``BLOCK_SIZE`` exceeds the model's context."""
    if block_size > n_positions:
        raise UserError(f"BLOCK_SIZE={block_size} exceeds the model's context of {n_positions} "
                        f"positions; set BLOCK_SIZE to {n_positions} or less")


def _model_file(config: ModelSettings, filename: str) -> str | None:
    from transformers.utils import cached_file

    try:
        return cached_file(config.gpt2_model_name, filename,
                           local_files_only=not config.allow_download,
                           _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        return None


def _is_genuine_gpt2(vocab: dict[str, int], merges: list[str]) -> bool:
    """Whether a folder's BPE files (as :func:`_read_bpe_files` read them) hold exactly the
    genuine GPT-2 vocabulary and merges."""
    from lmtrain.data.tokenizers import gpt2_file

    return vocab == json.loads(gpt2_file("encoder.json")) and merges == _merge_lines(
        gpt2_file("vocab.bpe").decode("utf-8"))


def _merge_lines(text: str) -> list[str]:
    """The lines of a ``merges.txt`` that say something (blank ones dropped)."""
    return [line for line in text.splitlines() if line.strip()]


def gpt2_tokenizer(config: ModelSettings, data: DataSettings) -> Tokenizer:
    """The GPT-2 BPE of a fresh ``MODEL_TYPE=gpt2`` run: the folder's own, else the shipped one.

    Also checks ``TOKENIZATION_METHOD`` and ``BLOCK_SIZE`` before any data is tokenized.
    """
    from lmtrain.data.tokenizers import GPT2FilesTokenizer, GPT2Tokenizer

    if data.tokenization_method != "gpt2":
        raise UserError(
            f"TOKENIZATION_METHOD={data.tokenization_method!r} does not apply to "
            f"MODEL_TYPE=gpt2, which always uses GPT-2's own BPE; unset TOKENIZATION_METHOD or "
            f"set it to gpt2")
    hf_config = gpt2_config(config)
    vocab_file, merges_file = _model_file(config, "vocab.json"), _model_file(config, "merges.txt")
    tokenizer: Tokenizer = GPT2Tokenizer()
    if vocab_file and merges_file and not _is_genuine_gpt2(
            *_read_bpe_files(config, vocab_file, merges_file)):  # checked, then compared
        try:
            tokenizer = GPT2FilesTokenizer.from_files(vocab_file, merges_file)
        except Exception as exc:  # the tokenizers library's own error types
            raise damaged_file(config, merges_file, exc) from None
    check_vocab_size(config, tokenizer.vocab_size, hf_config.vocab_size)
    return tokenizer


def damaged_file(config: ModelSettings, file: str | Path, exc: BaseException) -> UserError:
    """The one line for a file of a GPT-2 folder that does not read."""
    return UserError(
        f"GPT2_MODEL_NAME={config.gpt2_model_name!r} (or --base): {file} is damaged "
        f"({type(exc).__name__}: {_first_line(exc)}); restore that file, e.g. with "
        f"save_pretrained again, or point to another folder")


def _read_bpe_files(config: ModelSettings, vocab_file: str, merges_file: str
                    ) -> tuple[dict[str, int], list[str]]:
    """``vocab.json`` (a JSON map of tokens to ids) and the lines of ``merges.txt`` (UTF-8 lines
    of two tokens after a ``#version`` line), checked; else one line naming the file."""
    try:
        with open(vocab_file, encoding="utf-8") as fh:
            vocab = json.load(fh)
        if not isinstance(vocab, dict) or not all(
                isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise ValueError("not a JSON object of tokens to ids")
    except (OSError, ValueError, RecursionError) as exc:
        raise damaged_file(config, vocab_file, exc) from None
    try:
        with open(merges_file, encoding="utf-8") as fh:
            lines = _merge_lines(fh.read())
        bad = next((i for i, ln in enumerate(lines, 1)
                    if not ln.startswith("#version") and len(ln.split()) != 2), None)
        if bad is not None:
            raise ValueError(f"line {bad} is not two tokens")
    except (OSError, ValueError) as exc:
        raise damaged_file(config, merges_file, exc) from None
    return vocab, lines


def check_vocab_size(config: ModelSettings, tokenizer_size: int, model_size: int) -> None:
    """A clear error when the tokenizer and the model's embeddings differ in size."""
    if tokenizer_size != model_size:
        raise UserError(
            f"GPT2_MODEL_NAME={config.gpt2_model_name!r}: the model has {model_size} token "
            f"embeddings but its tokenizer has {tokenizer_size} tokens; give a folder whose "
            f"vocab.json/merges.txt match the model (or none, for GPT-2's own 50,257)")


def dropout_overrides(dropout: float) -> dict[str, Any]:
    """``DROPOUT`` on GPT-2's residual, embedding and attention dropout."""
    return {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}


def load_gpt2(config: ModelSettings, vocab_size: int) -> GPT2LMHeadModel:
    """``GPT2LMHeadModel`` in fp32 with SDPA attention, ready to train (no KV cache)."""
    import torch
    from transformers import GPT2LMHeadModel

    hf_config = gpt2_config(config)
    check_vocab_size(config, vocab_size, hf_config.vocab_size)
    try:
        with quiet_transformers():
            model = GPT2LMHeadModel.from_pretrained(
                config.gpt2_model_name, local_files_only=not config.allow_download,
                attn_implementation="sdpa", dtype=torch.float32, use_cache=False,
                **dropout_overrides(config.dropout))
    except (OSError, ValueError) as exc:
        raise _not_found(config, _first_line(exc)) from None
    except Exception as exc:  # a damaged weights file: safetensors' or torch's own errors
        raise damaged_file(config, _weights_file(config), exc) from None
    if config.gradient_checkpointing:  # recompute activations in backward: less memory
        enable_checkpointing(model)
    return model


def _weights_file(config: ModelSettings) -> str:
    """The weights file a GPT-2 folder loads from (safetensors first, as transformers does)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        found = _model_file(config, name)
        if found:
            return found
    return "its weights file"


def enable_checkpointing(model: GPT2LMHeadModel) -> None:
    """Non-reentrant activation checkpointing of every block (dropout replays on recompute)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def find_base(saved: dict[str, str], override: str | None) -> str:
    """The GPT-2 folder or hub id to load an adapter's base from.

    ``override`` (``--base`` / ``GPT2_MODEL_NAME``) when given; else the first of the saved
    absolute folder, the saved hub id's cached snapshot at the saved revision, and the name as
    it was given, that exists. The caller checks the fingerprint of what it loads.
    """
    if override:
        return override
    resolved, revision = saved.get("resolved") or "", saved.get("revision") or ""
    candidates = [resolved if Path(resolved).is_absolute() else None,
                  snapshot_folder(resolved, revision) if resolved and revision else None]
    for folder in candidates:
        if folder and Path(folder).is_dir():
            return folder
    name = saved.get("name") or ""
    if Path(name).expanduser().is_dir() or locate(name)["revision"]:
        return name  # a folder here, or a hub id at whatever revision the cache holds
    raise UserError(
        f"the LoRA adapter's base model {name!r} (resolved {resolved or name!r}) is not found "
        f"from {os.getcwd()!r}; pass --base (or set GPT2_MODEL_NAME) to the folder or hub id "
        f"of that base model: its weights fingerprint decides whether it fits")
