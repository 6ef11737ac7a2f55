"""Files on disk: atomic writes (a crash leaves the old file or the new one, never half of one)
and tensor-file reads that trust nothing they have not checked.

A safetensors file starts with the length of its JSON table; a damaged file can claim any
length, any shape and any offsets. :func:`safetensors_table` checks the table against the
file's size (and every tensor's extent against the data section) before anything is
allocated, so a damaged file ends in :class:`~pwf_core.errors.CheckpointError` naming it,
never in a ``MemoryError`` or an ``OverflowError``. Files pwf writes also carry a SHA-256 of
their tensors and metadata, so changed bytes anywhere are found too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
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


_SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be a SQLite database, or ``None`` when it can (a database, an empty
    file, or a file not made yet in an existing folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return f"'{path}' is a folder, not a database file"
    if not path.exists():
        return None if path.parent.is_dir() else f"folder '{path.parent}' does not exist"
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_SQLITE_MAGIC))
    except OSError as err:
        return f"'{path}' cannot be read ({err.strerror or err})"
    if head and head != _SQLITE_MAGIC:
        return f"'{path}' is not a SQLite database"
    return None


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


# safetensors' own limit on the JSON table; a longer claim is damage, not a file.
_TABLE_LIMIT = 100_000_000
_METADATA = "__metadata__"
DIGEST_KEY = "pwf.sha256"
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2": 8,
    "F8_E5M2FNUZ": 8,
    "U16": 16,
    "I16": 16,
    "F16": 16,
    "BF16": 16,
    "U32": 32,
    "I32": 32,
    "F32": 32,
    "U64": 64,
    "I64": 64,
    "F64": 64,
    "C64": 64,
}


@dataclass(frozen=True)
class TensorTable:
    """The checked table of a safetensors file.

    Args:
        tensors: Each tensor's ``dtype``, ``shape`` and ``data_offsets``, by name.
        metadata: The string metadata (``__metadata__``).
        data_start: Where the data section begins in the file.
    """

    tensors: dict[str, dict]
    metadata: dict[str, str]
    data_start: int


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"'{path}' is damaged or not a safetensors file: {why}")


def _check_entry(path: Path, name: str, entry: object) -> tuple[int, int]:
    """The ``[begin, end)`` of one tensor, after checking its dtype, shape and extent agree."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _damaged(path, f"tensor '{name}' has no dtype, shape and data_offsets")
    bits = _DTYPE_BITS.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    shape, offsets = entry["shape"], entry["data_offsets"]
    if bits is None:
        raise _damaged(path, f"tensor '{name}' has an unknown dtype {entry['dtype']!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _damaged(path, f"tensor '{name}' has an impossible shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _damaged(path, f"tensor '{name}' has impossible data offsets {offsets!r}")
    if math.prod(shape) * bits // 8 != offsets[1] - offsets[0]:
        raise _damaged(
            path,
            f"tensor '{name}' ({entry['dtype']} {shape}) does not fill its "
            f"{offsets[1] - offsets[0]} bytes",
        )
    return offsets[0], offsets[1]


def safetensors_table(path: str | Path) -> TensorTable:
    """The table of a safetensors file, checked against the file before anything is allocated.

    The table's length must fit in the file, the table must be a JSON object of tensors and
    string metadata, every tensor's dtype and shape must fill its extent exactly, and the
    extents must tile the data section to the file's last byte.

    Raises:
        CheckpointError: naming the path and the first fault found.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a folder, not a tensor file")
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise _damaged(path, f"{size} bytes, shorter than a safetensors header")
            length = int.from_bytes(handle.read(8), "little")
            if length > min(size - 8, _TABLE_LIMIT):
                raise _damaged(
                    path, f"its header claims {length} bytes of table in a {size}-byte file"
                )
            raw = handle.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"'{path}' does not exist") from None
    except OSError as err:
        raise CheckpointError(f"cannot read '{path}': {err.strerror or err}") from None
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _damaged(path, "its table is not JSON") from None
    if not isinstance(table, dict):
        raise _damaged(path, "its table is not a JSON object")
    metadata = table.pop(_METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _damaged(path, "its metadata is not a mapping of strings")
    extents = sorted(_check_entry(path, name, entry) for name, entry in table.items())
    end = 0
    for begin, stop in extents:
        if begin != end:
            raise _damaged(path, f"its tensors leave a gap or overlap at data byte {begin}")
        end = stop
    if 8 + length + end != size:
        raise _damaged(
            path, f"its tensors end at byte {8 + length + end} of a {size}-byte file (cut short?)"
        )
    return TensorTable(table, metadata, 8 + length)


def tensor_digest(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, then the metadata, in name
    order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    metadata = metadata or {}
    for key in sorted(metadata):
        if key != DIGEST_KEY:
            digest.update(f"{key}={metadata[key]};".encode())
    return digest.hexdigest()


def save_tensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    checksum: bool = True,
) -> Path:
    """Write ``tensors`` (and string ``metadata``) to a safetensors file atomically.

    Args:
        checksum: Record a SHA-256 of the tensors and metadata, which every read checks.
    """
    # safetensors refuses tensors that share storage, so every entry gets its own copy.
    owned = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    metadata = dict(metadata or {})
    if checksum:
        metadata[DIGEST_KEY] = tensor_digest(owned, metadata)
    with atomic_path(path) as tmp:
        save_file(owned, str(tmp), metadata=metadata)
    return Path(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    table = safetensors_table(path)
    try:
        tensors = load_file(str(path))
    except OSError as err:
        raise CheckpointError(f"cannot read '{path}': {err.strerror or err}") from None
    except Exception as err:  # the table passed; what safetensors still refuses is damage
        raise _damaged(path, f"{type(err).__name__}: {err}") from None
    expected = table.metadata.get(DIGEST_KEY)
    if expected is not None and tensor_digest(tensors, table.metadata) != expected:
        raise CheckpointError(
            f"'{path}' is corrupted: its tensors and header do not match the checksum saved "
            "with them"
        )
    return tensors


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses anything but tensors and plain containers: a file that would
        # run code on load ends here.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint '{path}' holds objects other than tensors and was refused ({first})"
        ) from None
    except MemoryError:
        raise CheckpointError(f"'{path}' is damaged: it claims more memory than exists") from None
    except Exception as err:  # torch's readers fail in many ways on bytes that are no file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"cannot read checkpoint '{path}': not a torch file ({type(err).__name__}"
            + (f": {first[:200]}" if first else "")
            + ")"
        ) from None


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``.pt``/``.pth`` file.

    A safetensors file's table is checked before anything is allocated, and its checksum when
    pwf wrote it. ``.pt`` files are read with ``weights_only=True``; a ``{"state_dict": ...}``
    wrapper is unwrapped.

    Raises:
        CheckpointError: naming the path when the file is missing, unreadable or damaged.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    state = _read_pickle(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint '{path}' does not hold a state dict of tensors")
    return state


def is_complete_safetensors(path: str | Path) -> bool:
    """Whether ``path`` is a whole safetensors file: its table checks out against the file
    (a truncated or damaged file fails this without loading any tensor)."""
    try:
        safetensors_table(path)
    except CheckpointError:
        return False
    return True


def is_sound_safetensors(path: str | Path) -> bool:
    """Whether ``path`` is whole and, when pwf wrote it, its bytes match their checksum (it
    reads the whole file: for the checkpoint a run resumes from, not for every look)."""
    try:
        _read_safetensors(Path(path))
    except CheckpointError:
        return False
    return True


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its JSON header's ``__metadata__``).

    Raises:
        CheckpointError: for a missing or damaged file.
    """
    return safetensors_table(path).metadata
