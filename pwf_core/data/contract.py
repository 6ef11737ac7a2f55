"""What a model trained on a dataset takes: from a raw sample to the tensor it reads.

Each dataset reader states its own (:attr:`ImageDataset.contract`): the values a raw pixel
takes, what pwf divides it by, the per-channel mean and standard deviation it subtracts and
divides by, the classes, and for image files how they are resized. The reader normalises its
images with the same object, so what is recorded is what the model was trained on. The
contract travels with the model (the compressed file's header, the ONNX file's
``metadata_props``): whoever receives the model can feed it raw data without reading pwf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

CONTRACT_KEY = "input"  # where a compressed file's header keeps it


@dataclass(frozen=True)
class InputContract:
    """How a raw sample becomes the model's input: ``(raw / divide_by - mean) / std``.

    Args:
        shape: One sample's ``(channels, height, width)``; a batch adds a first dimension.
        raw_range: The values a raw pixel takes (digits 0 to 16, 8-bit images 0 to 255).
        divide_by: What a raw pixel is divided by to lie in ``[0, 1]``.
        mean: Per-channel mean subtracted after the division.
        std: Per-channel standard deviation divided out last.
        class_names: The class of each output, in order (``None`` where unknown).
        resize: How an image file becomes ``shape`` (image folders; ``None``: it has it).
        layout: The order of the dimensions.
        dtype: The element type the model takes.
    """

    shape: tuple[int, int, int]
    raw_range: tuple[float, float]
    divide_by: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    resize: str | None = None
    layout: str = "NCHW"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        channels = self.shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"input contract: {channels} channels but mean {self.mean} and std {self.std}"
            )
        if self.divide_by <= 0 or any(s <= 0 for s in self.std):
            raise ValueError("input contract: divide_by and std must be positive")

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """A batch of raw samples ``(N, C, H, W)`` as the model takes it (float32)."""
        view = (1, len(self.mean), 1, 1)
        scaled = raw.float() / self.divide_by
        return (scaled - torch.tensor(self.mean).view(view)) / torch.tensor(self.std).view(view)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, with the formula spelt out for a reader."""
        return asdict(self) | {"normalise": "(raw / divide_by - mean) / std, per channel"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputContract:
        """The contract :meth:`as_dict` wrote.

        Raises:
            ValueError: when ``data`` is not a whole contract.
        """
        try:
            names = data.get("class_names")
            return cls(
                shape=tuple(int(v) for v in data["shape"]),  # type: ignore[arg-type]
                raw_range=(float(data["raw_range"][0]), float(data["raw_range"][1])),
                divide_by=float(data["divide_by"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                class_names=tuple(str(n) for n in names) if names is not None else None,
                resize=data.get("resize"),
                layout=str(data.get("layout", "NCHW")),
                dtype=str(data.get("dtype", "float32")),
            )
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise ValueError(f"not an input contract: {err!r}") from None

    def describe(self, in_graph: bool = False) -> str:
        """One line: the input's type and shape, what a raw sample goes through, the classes.

        Args:
            in_graph: The model does the normalisation itself (it takes raw samples).
        """
        low, high = (f"{v:g}" for v in self.raw_range)
        numbers = ", ".join(f"{v:.4f}" for v in self.mean), ", ".join(f"{v:.4f}" for v in self.std)
        steps = (
            "normalised in the graph"
            if in_graph
            else f"divide by {self.divide_by:g}, subtract mean ({numbers[0]}), divide by std "
            f"({numbers[1]})"
        )
        size = " x ".join(str(s) for s in self.shape)
        text = f"{self.dtype} [batch x {size}] ({self.layout}): raw pixels {low} to {high}, {steps}"
        if self.resize:
            text += f"; {self.resize}"
        if self.class_names:
            shown = ", ".join(self.class_names[:10]) + (
                ", ..." if len(self.class_names) > 10 else ""
            )
            text += f"; {len(self.class_names)} classes: {shown}"
        return text


def recorded_contract(header: Mapping[str, Any]) -> InputContract | None:
    """The contract a compressed file's header records (``None``: written by an older pwf).

    Raises:
        ValueError: when the header holds a damaged contract.
    """
    data = header.get(CONTRACT_KEY)
    return None if data is None else InputContract.from_dict(data)
