"""Files on disk: atomic writes (a crash leaves the old file or the new one, never half of one)
and safetensors reads that fail with the path named."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pwf_core.errors import CheckpointError


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) between processes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto it.

    Example: ``with atomic_path(out) as tmp: frame.to_parquet(tmp)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        # mkstemp (and some writers) create 0600; the final file gets the mode any other new
        # file would get, so a teammate or an MLflow server running as another user can read it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def smallest_index_dtype(count: int) -> torch.dtype:
    """The smallest integer dtype safetensors stores that indexes ``count`` values."""
    if count <= 2**8:
        return torch.uint8
    if count <= 2**15:
        return torch.int16
    return torch.int32


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (and string ``metadata``) to a safetensors file atomically."""
    # safetensors refuses tensors that share storage, so every entry gets its own copy.
    owned = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(owned, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``.pt``/``.pth`` file.

    ``.pt`` files are read with ``weights_only=True``; a ``{"state_dict": ...}`` wrapper is
    unwrapped.

    Raises:
        CheckpointError: naming the path when the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses anything but tensors and plain containers: a file that would
        # run code on load ends here.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint '{path}' holds objects other than tensors and was refused ({first})"
        ) from None
    except (
        SafetensorError,
        OSError,
        RuntimeError,
        ValueError,
        EOFError,
        zipfile.BadZipFile,
    ) as err:
        raise CheckpointError(f"cannot read checkpoint '{path}': {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint '{path}' does not hold a state dict of tensors")
    return state


def is_complete_safetensors(path: str | Path) -> bool:
    """Whether ``path`` is a whole safetensors file: its header parses and the file is exactly
    as long as the header says (a truncated file fails this without loading any tensor)."""
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
            size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError):
        return False
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return size == 8 + header_size + max(ends, default=0)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its JSON header's ``__metadata__``)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint '{path}': {err}") from None
