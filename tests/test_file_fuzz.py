"""Every file pwf reads, damaged every way a disk, a copy or a user damages it: random bytes,
truncation at many offsets, flipped bytes in the header, a valid header with impossible
shapes. Each case ends in the reader's typed error (or, where the damage left a valid file, in
the same content), never in another exception: no ``MemoryError``, ``OverflowError``,
``IndexError`` or unpickler trace reaches a user.
"""

from __future__ import annotations

import json
import pickle
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from pwf_core import compress, load_compressed, save_compressed
from pwf_core.checkpoint import load_checkpoint, save_checkpoint
from pwf_core.config import load_config
from pwf_core.data import DataConfig, load_dataset
from pwf_core.data.imagefolder import read_image
from pwf_core.errors import CheckpointError, CompressedFileError, ConfigError, DatasetError
from pwf_core.models import load_weights
from pwf_flows.sweep.spec import load_sweep
from tests._dummies.files import write_cifar10, write_image_folder, write_mnist
from tests._dummies.models import TinyMLP
from tests.conftest import DEFAULT_CONFIG, ROOT

SEED = 0


def _safetensors_table_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little") if len(data) >= 8 else len(data)


def mutations(data: bytes, header_end: int | None = None) -> Iterator[tuple[str, bytes]]:
    """Damaged versions of ``data``, each with a name: random bytes of several sizes, every
    truncation in the first 64 bytes and 40 spread over the rest, single bit flips and byte
    swaps in the header (the first ``header_end`` bytes) and in the body.

    Args:
        data: The file's bytes.
        header_end: Where the header ends (default: the first 256 bytes).
    """
    rng = random.Random(SEED)
    for size in (0, 1, 7, 8, 9, 64, 4096):
        yield f"random-{size}", rng.randbytes(size)
    cuts = set(range(min(64, len(data)))) | {rng.randrange(len(data)) for _ in range(40)}
    for cut in sorted(cuts):
        yield f"truncated-at-{cut}", data[:cut]
    header_end = min(header_end or 256, len(data))
    positions = set(range(min(header_end, 48))) | {rng.randrange(header_end) for _ in range(60)}
    for position in sorted(positions):
        bit = 1 << rng.randrange(8)
        flipped = bytearray(data)
        flipped[position] ^= bit
        yield f"header-bit-{position}", bytes(flipped)
        swapped = bytearray(data)
        swapped[position] = rng.randrange(256)
        yield f"header-byte-{position}", bytes(swapped)
    for _ in range(20):
        position = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[position] ^= 0xFF
        yield f"body-byte-{position}", bytes(flipped)


def impossible_tables() -> Iterator[tuple[str, bytes]]:
    """Safetensors files whose JSON table parses but describes what cannot be."""
    body = bytes(16)

    def file(table: dict, length: int | None = None, data: bytes = body) -> bytes:
        raw = json.dumps(table).encode()
        return struct.pack("<Q", len(raw) if length is None else length) + raw + data

    f32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    yield "negative-dim", file({"w": {**f32, "shape": [-4]}})
    yield "huge-shape", file({"w": {**f32, "shape": [2**40, 2**40]}})
    yield "shape-not-list", file({"w": {**f32, "shape": "4"}})
    yield "float-dim", file({"w": {**f32, "shape": [4.0]}})
    yield "shape-mismatch", file({"w": {**f32, "shape": [3]}})
    yield "offsets-past-end", file({"w": {**f32, "data_offsets": [0, 2**62]}})
    yield "offsets-reversed", file({"w": {**f32, "data_offsets": [16, 0]}})
    yield "offsets-negative", file({"w": {**f32, "data_offsets": [-16, 0]}})
    yield (
        "offsets-overlap",
        file({"a": {**f32, "shape": [2], "data_offsets": [0, 8]}, "b": f32}, data=bytes(24)),
    )
    yield "offsets-gap", file({"a": {**f32, "shape": [2], "data_offsets": [8, 16]}})
    yield "unknown-dtype", file({"w": {**f32, "dtype": "F128"}})
    yield "entry-not-object", file({"w": [1, 2, 3]})
    yield "table-a-list", file([f32])  # type: ignore[arg-type]
    yield "metadata-not-strings", file({"__metadata__": {"pwf": 1}, "w": f32})
    yield "length-past-file", file({"w": f32}, length=10_000)
    yield "length-2^63", file({"w": f32}, length=2**63)
    yield "length-2^64-1", file({"w": f32}, length=2**64 - 1)
    yield "data-short", file({"w": f32}, data=bytes(8))
    yield "data-long", file({"w": f32}, data=bytes(32))


@dataclass(frozen=True)
class Kind:
    """A kind of file pwf reads: how to write a good one, how pwf reads it, what it raises.

    Args:
        write: Writes a good file under a folder; returns its path.
        read: pwf's reader; returns what it read.
        error: The typed error the reader raises for a damaged file.
        same: Whether two reads hold the same content (None: a valid variant may differ).
        header_end: Where the file's header ends, from its bytes.
    """

    write: Callable[[Path], Path]
    read: Callable[[Path], object]
    error: type[Exception]
    same: Callable[[object, object], bool] | None = None
    header_end: Callable[[bytes], int] | None = None
    safetensors: bool = False


def _states_equal(a: object, b: object) -> bool:
    a_state, b_state = dict(a), dict(b)  # type: ignore[call-overload]
    return a_state.keys() == b_state.keys() and all(
        torch.equal(a_state[k], b_state[k]) for k in a_state
    )


def _write_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(folder / "step_04.safetensors", TinyMLP(), header={"round": 4})


def _read_checkpoint(path: Path) -> object:
    model = TinyMLP()
    header = load_checkpoint(path, model)
    return {**model.state_dict(), "header": torch.tensor(len(json.dumps(header)))}


def _write_compressed(folder: Path) -> Path:
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    model = TinyMLP()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    method = {"method": "uniform", "bits": 3, "schedule": [1.0]}
    compress(model, loader, method, train={"epochs": 0, "first_round_epochs": 0}, progress=False)
    return save_compressed(model, folder / "model.pwf.safetensors").path


def _read_compressed(path: Path) -> object:
    return load_compressed(path, model=TinyMLP()).state_dict()


def _write_user_safetensors(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in TinyMLP().state_dict().items()}, str(path))
    return path


def _write_user_pt(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "weights.pt"
    torch.save(TinyMLP().state_dict(), path)
    return path


def _read_weights(path: Path) -> object:
    return load_weights(TinyMLP(), path).state_dict()


def _write_config(folder: Path) -> Path:
    path = folder / "config.yaml"
    path.write_bytes(DEFAULT_CONFIG.read_bytes())
    return path


def _write_sweep(folder: Path) -> Path:
    text = (ROOT / "sweeps" / "full-sweep.yaml").read_text()
    path = folder / "sweep.yaml"
    path.write_text(text.replace("../configs/default.yaml", str(DEFAULT_CONFIG)))
    return path


def _read_sweep(path: Path) -> object:
    return load_sweep(path).model_dump(mode="json")


def _write_mnist_images(folder: Path) -> Path:
    write_mnist(folder / "mnist", n_train=12, n_test=4)
    return folder / "mnist" / "train-images-idx3-ubyte"


def _write_mnist_gz(folder: Path) -> Path:
    write_mnist(folder / "mnist", n_train=12, n_test=4, compress=True)
    return folder / "mnist" / "train-labels-idx1-ubyte.gz"


def _idx_header_end(data: bytes) -> int:
    return 4 + 4 * data[3]


def _read_dataset(name: str) -> Callable[[Path], object]:
    def read(path: Path) -> object:
        folder = path.parent
        return load_dataset(DataConfig(name=name, path=folder, val_fraction=0.0)).num_classes

    return read


def _write_cifar_batch(folder: Path) -> Path:
    write_cifar10(folder / "cifar", per_batch=2)
    return folder / "cifar" / "data_batch_1"


def _write_png(folder: Path) -> Path:
    write_image_folder(folder / "images", classes=1, per_class=1, size=8)
    return folder / "images" / "train" / "class_0" / "0.png"


def _read_png(path: Path) -> object:
    return read_image(str(path)).size


KINDS = {
    "checkpoint": Kind(
        _write_checkpoint,
        _read_checkpoint,
        CheckpointError,
        _states_equal,
        _safetensors_table_end,
        safetensors=True,
    ),
    "compressed-model": Kind(
        _write_compressed,
        _read_compressed,
        CompressedFileError,
        _states_equal,
        _safetensors_table_end,
        safetensors=True,
    ),
    # a user's file carries no checksum: changed tensor bytes read as other weights
    "weights-safetensors": Kind(
        _write_user_safetensors,
        _read_weights,
        CheckpointError,
        header_end=_safetensors_table_end,
        safetensors=True,
    ),
    "weights-pt": Kind(_write_user_pt, _read_weights, CheckpointError),
    "config": Kind(_write_config, load_config, ConfigError),
    "sweep-file": Kind(_write_sweep, _read_sweep, ConfigError),
    "mnist-idx": Kind(
        _write_mnist_images, _read_dataset("mnist"), DatasetError, header_end=_idx_header_end
    ),
    "mnist-idx-gz": Kind(_write_mnist_gz, _read_dataset("mnist"), DatasetError),
    "cifar10-batch": Kind(_write_cifar_batch, _read_dataset("cifar10"), DatasetError),
    "image": Kind(_write_png, _read_png, DatasetError),
}


def _outcome(kind: Kind, path: Path) -> tuple[str, object]:
    try:
        return "read", kind.read(path)
    except kind.error as err:
        assert str(err).strip(), "a typed error with no message"
        return "refused", None


@pytest.mark.parametrize("name", sorted(KINDS))
def test_damaged_files_end_in_the_readers_typed_error(name: str, tmp_path: Path):
    kind = KINDS[name]
    path = kind.write(tmp_path)
    original = path.read_bytes()
    good = kind.read(path)
    cases = list(mutations(original, kind.header_end(original) if kind.header_end else None))
    if kind.safetensors:
        cases += list(impossible_tables())
    outcomes: dict[str, int] = {"read": 0, "refused": 0}
    for case, data in cases:
        path.write_bytes(data)
        try:
            outcome, content = _outcome(kind, path)
        except Exception as err:
            raise AssertionError(f"{name}, {case}: {type(err).__name__}: {err}") from err
        outcomes[outcome] += 1
        if outcome == "read" and kind.same is not None and data != original:
            # pwf's own files carry a checksum: damage that still reads must read the same
            assert kind.same(content, good), f"{name}, {case}: read different content"
    assert outcomes["refused"] > 0, outcomes
    path.write_bytes(original)
    assert kind.read(path) is not None  # the good file still reads


def test_a_changed_byte_in_a_checkpoint_is_found_by_its_checksum(tmp_path: Path):
    path = _write_checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: the table is still right
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        _read_checkpoint(path)


def test_a_repeated_yaml_key_is_named_with_its_line(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("name: x\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"'lr' on line 5 repeats the one on line 3"):
        load_config(path)


def test_a_folder_given_as_a_file_is_named_a_folder(tmp_path: Path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_weights(TinyMLP(), tmp_path)
    with pytest.raises(CompressedFileError, match="is a folder"):
        load_compressed(tmp_path, model=TinyMLP())


def test_labels_out_of_range_are_refused_at_the_reader(tmp_path: Path):
    folder = write_cifar10(tmp_path / "cifar", per_batch=2)
    batch = pickle.loads((folder / "data_batch_1").read_bytes())
    batch[b"labels"] = [0, 10]
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetError, match="expected class indices 0 to 9"):
        load_dataset(DataConfig(name="cifar10", path=folder))
