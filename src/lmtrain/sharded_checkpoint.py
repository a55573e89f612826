"""Sharded checkpoints (``PARALLEL=fsdp``): one folder per step, ``step_NNNNNNN.dcp/``, written
by every process through ``torch.distributed.checkpoint`` (DCP), keeping every promise of the
single-file format (:mod:`lmtrain.checkpoint`):

- **whole or absent**: the processes write into ``.tmp-step_NNNNNNN.dcp/``, rank 0 seals it and
  renames it into place, so a kill -9 at any moment leaves no half checkpoint;
- **checked**: ``manifest.json`` holds the sha256 of every file; a missing, added or altered
  file is refused before anything in it is read;
- **no code run**: DCP unpickles its ``.metadata`` with plain :mod:`pickle`; here it is read
  through an unpickler that knows only DCP's own metadata classes, and DCP's non-tensor
  values through ``torch.load(weights_only=True)``;
- **validated as today**: ``run.pt`` is the run's record (settings, tokenizer, progress,
  every rank's generators), a sealed checkpoint of :mod:`lmtrain.checkpoint_format` whose
  weights and optimizer state are the DCP files beside it.

The weights and the optimizer state are saved under their names (FQNs) with their global
shapes, so a checkpoint written by N processes loads into M (DCP reshards on load).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtrain.checkpoint_format import SavedRun, seal, sharded_record, validate
from lmtrain.durable import TMP_PREFIX, replace_folder
from lmtrain.errors import UserError

if TYPE_CHECKING:
    from torch import nn

SUFFIX = ".dcp"
MANIFEST = "manifest.json"
RECORD = "run.pt"
OLD_PREFIX = ".old-"
#: The manifest's format tag (bumped when the folder layout changes).
LAYOUT = "lmtrain-dcp-1"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (by its name and manifest)."""
    path = Path(path)
    return path.is_dir() and (path.name.endswith(SUFFIX) or (path / MANIFEST).is_file())


@dataclass(frozen=True, eq=False)
class ShardedRun(SavedRun):
    """A sharded checkpoint as its readers see it: the run record (:class:`SavedRun`) and the
    folder whose DCP files hold the weights and optimizer state (:func:`load_sharded_state`)."""

    folder: Path = Path()


# --- no pickled code ------------------------------------------------------------------------

#: The only classes DCP's ``.metadata`` pickle may name (module -> names).
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (a function that runs code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_metadata_safely(path: Path, where: str) -> Any:
    """DCP's ``.metadata`` of a checkpoint folder, unpickled without running code."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
            IndexError) as exc:
        raise UserError(f"{where} was refused and nothing in it was run: its DCP metadata holds "
                        f"something other than DCP's own records ({str(exc)[:120]}); load only "
                        f"checkpoints that lmtrain wrote") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{where} is damaged: its DCP metadata is a {type(metadata).__name__}; "
                        f"pick an earlier checkpoint")
    return metadata


def _reader(folder: Path, where: str) -> Any:
    """A DCP ``FileSystemReader`` whose metadata comes from :func:`read_metadata_safely`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata_safely(folder / ".metadata", where)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)


def _planner() -> Any:
    """DCP's default load planner, reading non-tensor values with ``weights_only=True``."""
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise UserError(f"a sharded checkpoint holds a value that could run code when "
                                f"loaded ({str(exc).splitlines()[0][:120]}); it was refused "
                                f"and nothing in it was run") from None
            super().load_bytes(read_item, _Saved(loaded))  # type: ignore[arg-type]

    return SafePlanner()


class _Saved(io.BytesIO):
    """A value already loaded safely, handed to DCP's planner as the stream it expects."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        import torch

        torch.save(value, self)
        self.seek(0)


# --- integrity --------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


def write_manifest(folder: Path, world_size: int) -> None:
    """The sha256 of every file in ``folder`` (rank 0, once all shards are written)."""
    files = {name: _sha256(folder / name) for name in _files(folder)}
    body = json.dumps({"layout": LAYOUT, "processes": world_size, "files": files}, indent=1)
    with open(folder / MANIFEST, "w", encoding="utf-8") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())


def verify(folder: Path, where: str) -> None:
    """Every file the manifest lists is present, unaltered, and nothing else is there."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        listed = manifest["files"]
        assert manifest["layout"] == LAYOUT and isinstance(listed, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{where} is not a sharded lmtrain checkpoint: its {MANIFEST} is "
                        f"missing or unreadable; pick another checkpoint") from None
    present = set(_files(folder))
    missing = sorted(set(listed) - present)
    if missing:
        raise UserError(f"{where} is incomplete: shard file(s) {', '.join(missing[:3])} are "
                        f"missing; copy the whole folder, or pick an earlier checkpoint")
    extra = sorted(present - set(listed))
    if extra:
        raise UserError(f"{where} holds file(s) it was not written with ({', '.join(extra[:3])}); "
                        f"remove them, or pick an earlier checkpoint")
    altered = [name for name in sorted(listed) if _sha256(folder / name) != listed[name]]
    if altered:
        raise UserError(f"{where} is corrupt: shard file(s) {', '.join(altered[:3])} do not "
                        f"match their sha256 digest (changed after they were written); pick an "
                        f"earlier checkpoint")


# --- the run record ---------------------------------------------------------------------------

def load_sharded_run(folder: str | Path, label: str = "CHECKPOINT_PATH") -> ShardedRun:
    """Check a sharded checkpoint folder (manifest, digests, metadata) and read its run record
    (validated as a single-file checkpoint is); one line for whatever is wrong."""
    import torch

    folder = Path(folder)
    where = f"{label}={str(folder)!r}"
    verify(folder, where)
    read_metadata_safely(folder / ".metadata", where)
    try:
        record = torch.load(folder / RECORD, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{where} was refused and nothing in it was run: its {RECORD} holds "
                        f"objects other than plain data; load only checkpoints that lmtrain "
                        f"wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{where}: its {RECORD} is unreadable ({str(exc)[:120]}); pick an "
                        f"earlier checkpoint") from None
    validate(record, where)
    return ShardedRun(record, where, folder)


# --- writing ----------------------------------------------------------------------------------

def _state(model: nn.Module, optimizer: Any, trainable_only: bool) -> dict[str, Any]:
    """The weights and optimizer state by name (this rank's shards, global shapes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=trainable_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optimizer": optim_sd}


def _identity(value: Any) -> Any:
    return value


def save_sharded(folder: Path, model: nn.Module, optimizer: Any, payload: dict[str, Any],
                 is_main: bool, world_size: int, trainable_only: bool = False,
                 agree: Callable[[Any], Any] = _identity) -> Path:
    """Write the sharded checkpoint ``folder`` (a collective: every process calls it).

    ``payload``: the run's checkpoint as :mod:`lmtrain.train.checkpointing` builds it (its
    weights and optimizer state are taken from ``model``/``optimizer`` instead); only rank 0's
    is written. ``trainable_only``: LoRA, the frozen base is not saved. ``agree`` hands rank
    0's value to every rank (a broadcast). A failed write raises ``OSError`` on every rank;
    DCP's own failures raise its ``CheckpointException`` on every rank."""
    import torch.distributed.checkpoint as dcp

    tmp = folder.parent / f"{TMP_PREFIX}{folder.name}"
    _agreed(agree, is_main, lambda: _start(tmp))
    writer = dcp.FileSystemWriter(tmp, sync_files=True, single_file_per_rank=True)
    with warnings.catch_warnings():  # one process: DCP says it saves without a group
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(_state(model, optimizer, trainable_only), storage_writer=writer)
    _agreed(agree, is_main, lambda: _seal(tmp, folder, payload, world_size))
    return folder


def _agreed(agree: Callable[[Any], Any], is_main: bool, work: Callable[[], None]) -> None:
    """Rank 0 does ``work``; its ``OSError`` (as text) is raised on every rank."""
    error = ""
    if is_main:
        try:
            work()
        except OSError as exc:
            error = f"{exc.strerror or exc}"
    error = agree(error)
    if error:
        raise OSError(error)


def _start(tmp: Path) -> None:
    remove_stale_folders(tmp.parent)
    tmp.mkdir(parents=True)


def _seal(tmp: Path, folder: Path, payload: dict[str, Any], world_size: int) -> None:
    """The run record and the manifest beside the shards, then the folder into place."""
    import torch

    with open(tmp / RECORD, "wb") as fh:
        torch.save(seal(sharded_record(payload)), fh)
        fh.flush()
        os.fsync(fh.fileno())
    write_manifest(tmp, world_size)
    _replace(tmp, folder)


def _replace(tmp: Path, folder: Path) -> None:
    """Move the sealed ``tmp`` folder to ``folder`` (an older one of that step is set aside
    first and removed after)."""
    replace_folder(tmp, folder, folder.parent / f"{OLD_PREFIX}{folder.name}")


def remove_stale_folders(folder: Path) -> list[Path]:
    """Remove what an interrupted sharded write left in a run's checkpoint folder."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_dir() and p.name.endswith(SUFFIX) and p.name.startswith(
                    (TMP_PREFIX, OLD_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# --- reading into a live model ---------------------------------------------------------------

def load_sharded_state(run: ShardedRun, model: nn.Module, optimizer: Any,
                       trainable_only: bool = False) -> None:
    """Load the weights and optimizer state of ``run`` into ``model``/``optimizer`` (sharded or
    whole, at any world size: DCP reshards); one line if they do not fit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(model, optimizer, trainable_only)
    try:
        with warnings.catch_warnings():  # one process: DCP says it loads without a group
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=_reader(run.folder, run.where), planner=_planner())
    except UserError:
        raise
    except (RuntimeError, ValueError, KeyError, AssertionError, CheckpointException) as exc:
        detail = str(exc).strip().splitlines()
        raise UserError(
            f"{run.where}: its sharded weights do not fit the model built from its settings "
            f"({(detail[-1] if detail else type(exc).__name__)[:160]}); the file is damaged or "
            f"from another model") from None
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=options)

