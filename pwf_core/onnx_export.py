"""ONNX export of a compressed model: every shared tensor as one codebook and an index tensor.

ONNX has no lookup-table dequantisation operator (``DequantizeLinear`` is affine, and a
codebook of powers of two or of k-means centres is not), so the portable form of a shared
weight is ``Gather(codebook, Cast(index))``: one global float32 codebook initializer, and per
shared tensor an initializer of uint8 indices (uint16 past 256 values) cast to int32, which
every runtime's ``Gather`` takes. ``Gather`` on 1-D data returns the index tensor's shape, so
the result is the weight itself and feeds the ``Conv``/``Gemm`` the exporter wrote. ONNX
Runtime folds these constant subgraphs when a session starts, so inference runs as fast as on
the float file while the file holds one or two bytes per weight.

Layers the user kept in float, norms and running statistics stay float initializers.

Given the dataset's input contract, the file records it in its ``metadata_props`` (key
``pwf.input``, JSON: shape, dtype, raw value range, divisor, mean, std, class names), and
with ``preprocess`` its graph starts with the normalisation (``Div``, ``Sub``, ``Div``, the
same float32 operations pwf's reader applies), so it takes raw pixels.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pwf_core._files import atomic_path
from pwf_core.bayes import bayesian_params, strip
from pwf_core.data.contract import InputContract
from pwf_core.export import shared_weights

if TYPE_CHECKING:
    import onnx

# onnx is imported where it is used: it adds seconds to ``import pwf_core``, which most
# programs that import pwf never pay for an export.

CODEBOOK = "pwf.codebook"
INPUT_METADATA = "pwf.input"  # the input contract, JSON, among the file's metadata_props
_INDEX_TYPES = ((2**8, np.uint8), (2**16, np.uint16), (2**32, np.uint32))

__all__ = [
    "CODEBOOK",
    "INPUT_METADATA",
    "OnnxExport",
    "OnnxExportError",
    "check_onnx",
    "export_onnx",
    "recorded_input",
]


class OnnxExportError(RuntimeError):
    """The exported graph does not hold a shared tensor as itself (the exporter folded it into
    another tensor), so it cannot be stored as codebook indices."""


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Args:
        path: The ONNX file.
        file_bytes: Its size on disk.
        float_bytes: Size of a plain float32 ONNX export of the same model (the same graph,
            every weight a float initializer).
        shared_tensors: Parameter names of the tensors stored as codebook indices.
        codebook_size: Values in the global codebook.
        index_dtype: Dtype of the stored indices (``uint8``, ``uint16``; ``uint32`` only past
            65,536 values, when the indices are no smaller than the floats).
        contract: The input contract the file records (``None``: none given).
        preprocessed: The graph normalises raw pixels itself.
    """

    path: Path
    file_bytes: int
    float_bytes: int
    shared_tensors: tuple[str, ...]
    codebook_size: int
    index_dtype: str
    contract: InputContract | None = None
    preprocessed: bool = False

    @property
    def ratio(self) -> float:
        """How many times smaller the file is than the float ONNX export."""
        return self.float_bytes / self.file_bytes

    def as_metrics(self) -> dict[str, float]:
        """``size/onnx_bytes`` and ``size/onnx_float_bytes``, for MLflow."""
        return {
            "size/onnx_bytes": float(self.file_bytes),
            "size/onnx_float_bytes": float(self.float_bytes),
        }


def _inputs(example_input: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else example_input
    if (
        isinstance(inputs, str | bytes)
        or not isinstance(inputs, Sequence)
        or not inputs
        or not all(isinstance(t, torch.Tensor) for t in inputs)
    ):
        raise ValueError(
            "example_input must be a tensor (a batch the model takes, e.g. "
            f"torch.randn(1, 3, 32, 32)) or a tuple of tensors, got {type(example_input).__name__}"
        )
    return tuple(t.detach().cpu() for t in inputs)


def _plain_copy(model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` as the user's plain class, on the CPU, holding ``values``."""
    plain = copy.deepcopy(model)
    if bayesian_params(plain):
        strip(plain)
    plain = plain.cpu().eval()
    with torch.no_grad():
        for name, value in values.items():
            plain.get_parameter(name).copy_(value)
    return plain


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        outputs = model(*inputs)
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def _float_onnx(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], outputs: int, opset: int | None
) -> bytes:
    input_names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    output_names = ["logits"] if outputs == 1 else [f"output{i}" for i in range(outputs)]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The torch.export-based exporter (dynamo=True, torch's default) needs onnxscript,
        # which pwf does not depend on; the TorchScript exporter needs nothing more, and its
        # DeprecationWarnings would tell a user to change code that is ours, not theirs.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            inputs,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in (*input_names, *output_names)},
            # Constant folding in eval mode folds each BatchNorm into the conv before it,
            # which turns the shared values into per-channel scaled ones; without folding
            # every parameter is an initializer of its own (ONNX Runtime folds on load).
            do_constant_folding=False,
        )
    return buffer.getvalue()


def _key(array: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    return array.shape, np.ascontiguousarray(array, dtype=np.float32).tobytes()


def _locate(graph: onnx.GraphProto, values: dict[str, np.ndarray]) -> dict[str, str]:
    """The initializer holding each shared tensor: by name; through the ``Identity`` nodes the
    exporter writes for parameters equal to another; else by contents, as is or transposed
    (a renamed or pre-transposed weight).

    Raises:
        OnnxExportError: for a shared tensor no initializer holds.
    """
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    alias = {
        node.output[0]: node.input[0]
        for node in graph.node
        if node.op_type == "Identity" and len(node.input) == 1
    }
    by_contents: dict[tuple[tuple[int, ...], bytes], str] = {}
    for name, array in arrays.items():
        if array.dtype == np.float32:
            by_contents.setdefault(_key(array), name)
    located = {}
    for name, value in values.items():
        source = name
        while source not in arrays and source in alias:
            source = alias[source]
        if source in arrays and _key(arrays[source]) == _key(value):
            located[name] = source
            continue
        keys = [_key(value)] + ([_key(value.T)] if value.ndim == 2 else [])
        found = next((by_contents[k] for k in keys if k in by_contents), None)
        if found is None:
            raise OnnxExportError(
                f"the exported graph holds shared tensor '{name}' {tuple(value.shape)} in no "
                "initializer of its own (the exporter folded it into another tensor), so it "
                "would be stored in float; export with the exporter settings export_onnx uses"
            )
        located[name] = found
    return located


def _share(
    graph: onnx.GraphProto, initializers: set[str], codebook: np.ndarray, dtype: type
) -> None:
    """Replace each of ``initializers`` by ``Gather(codebook, Cast(index, int32))``."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    kept = []
    for init in graph.initializer:
        if init.name not in initializers:
            kept.append(init)
            continue
        array = numpy_helper.to_array(init)
        index = np.searchsorted(codebook, array).clip(0, len(codebook) - 1)
        if not np.array_equal(codebook[index], array):
            raise OnnxExportError(f"initializer '{init.name}' holds values outside the codebook")
        stored, cast = f"{init.name}.index", f"{init.name}.index_int32"
        kept.append(numpy_helper.from_array(index.astype(dtype), stored))
        nodes += [
            helper.make_node("Cast", [stored], [cast], to=TensorProto.INT32),
            helper.make_node("Gather", [CODEBOOK, cast], [init.name], axis=0),
        ]
    kept.append(numpy_helper.from_array(codebook, CODEBOOK))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph_inputs = [i for i in graph.input if i.name not in initializers]
    del graph.input[:]
    graph.input.extend(graph_inputs)
    # Their inputs are initializers, so the new nodes first keep the graph topologically sorted.
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *existing])


def _prepend_normalisation(graph: onnx.GraphProto, contract: InputContract) -> None:
    """Make the graph take raw pixels: its input, divided, centred and scaled as the contract
    says, feeds what the input fed."""
    from onnx import helper, numpy_helper

    raw = graph.input[0].name
    normalised = f"{raw}.normalised"
    for node in graph.node:
        node.input[:] = [normalised if name == raw else name for name in node.input]
    view = (1, len(contract.mean), 1, 1)
    constants = {
        "pwf.input.divide_by": np.array(contract.divide_by, dtype=np.float32),
        "pwf.input.mean": np.array(contract.mean, dtype=np.float32).reshape(view),
        "pwf.input.std": np.array(contract.std, dtype=np.float32).reshape(view),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    nodes = [
        helper.make_node("Div", [raw, "pwf.input.divide_by"], [f"{raw}.scaled"]),
        helper.make_node("Sub", [f"{raw}.scaled", "pwf.input.mean"], [f"{raw}.centred"]),
        helper.make_node("Div", [f"{raw}.centred", "pwf.input.std"], [normalised]),
    ]
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *existing])


def _record_input(proto: onnx.ModelProto, contract: InputContract, preprocessed: bool) -> None:
    """The contract among the file's metadata, and in words as its doc string."""
    from onnx import helper

    name = proto.graph.input[0].name
    recorded = contract.as_dict() | {"input_name": name, "normalisation_in_graph": preprocessed}
    if preprocessed:
        recorded["normalise"] = "done by the graph: feed raw pixels"
    helper.set_model_props(proto, {INPUT_METADATA: json.dumps(recorded)})
    proto.doc_string = f"pwf compressed model; input '{name}': {contract.describe(preprocessed)}"


def recorded_input(path: str | Path) -> dict | None:
    """The input contract an ONNX file records (``None``: it records none), as
    :func:`export_onnx` wrote it: :class:`~pwf_core.data.InputContract` fields plus
    ``input_name`` and ``normalisation_in_graph``."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[INPUT_METADATA]) if INPUT_METADATA in props else None


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    opset: int | None = None,
    contract: InputContract | None = None,
    preprocess: bool = False,
) -> OnnxExport:
    """Write ``model`` as ONNX with every shared tensor as a global codebook plus indices.

    The model itself is left untouched: a deep copy, turned back into your plain class and
    holding the shared (for 2DGBNN: the mean) weights, is exported with the batch dimension
    dynamic. The file is written atomically.

    Args:
        model: A model :func:`pwf_core.compress` returned (every weight fixed), a 2DGBNN
            model (its mean model is exported), or one :func:`pwf_core.load_compressed`
            loaded.
        path: Output ``.onnx`` file.
        example_input: A batch the model takes (a tensor, or a tuple of tensors for a model
            with several inputs); it fixes every dimension but the first.
        opset: ONNX opset version (default: the exporter's).
        contract: How a raw sample becomes the model's input (the dataset's); recorded in
            the file's metadata.
        preprocess: Put the contract's normalisation into the graph: the file takes raw
            pixels (``example_input`` stays what the model takes).

    Returns:
        The file and its size against a float32 ONNX export of the same model.

    Raises:
        NotCompressedError: when the model was never compressed or has free weights.
        ValueError: when ``example_input`` is not a tensor or does not run through the model,
            or ``preprocess`` is asked without a contract.
        OnnxExportError: when the exporter folded a shared tensor into another one.
    """
    import onnx

    if preprocess and contract is None:
        raise ValueError("preprocess needs the input contract (the dataset's normalisation)")

    values = shared_weights(model)
    inputs = _inputs(example_input)
    plain = _plain_copy(model, values)
    try:
        outputs = _run(plain, inputs)
    except Exception as err:  # whatever the model's forward raises, the input is at fault
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ValueError(
            f"example_input of shape {shapes} does not run through the model: "
            f"{type(err).__name__}: {err}"
        ) from None
    float_file = _float_onnx(plain, inputs, len(outputs), opset)
    proto = onnx.load_from_string(float_file)
    arrays = {name: v.detach().cpu().float().numpy() for name, v in values.items()}
    codebook = np.unique(np.concatenate([a.ravel() for a in arrays.values()]))
    dtype = next(t for limit, t in _INDEX_TYPES if len(codebook) <= limit)
    _share(proto.graph, set(_locate(proto.graph, arrays).values()), codebook, dtype)
    if preprocess:
        _prepend_normalisation(proto.graph, contract)
    if contract is not None:
        _record_input(proto, contract, preprocess)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    path = Path(path)
    return OnnxExport(
        path=path,
        file_bytes=path.stat().st_size,
        float_bytes=len(float_file),
        shared_tensors=tuple(values),
        codebook_size=len(codebook),
        index_dtype=np.dtype(dtype).name,
        contract=contract,
        preprocessed=preprocess,
    )


def check_onnx(
    path: str | Path,
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    onnx_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> float:
    """The largest ``|logit difference|`` between ONNX Runtime running ``path`` and ``model``
    (in eval mode; its own mode is restored) on ``inputs``.

    Args:
        path: An ONNX file, e.g. the one :func:`export_onnx` wrote for ``model``.
        model: The model to compare with.
        inputs: A batch (a tensor, or a tuple of tensors).
        onnx_inputs: What the file is fed instead (the raw pixels of ``inputs``, for a file
            that normalises them itself); default: ``inputs``.

    Raises:
        ImportError: when onnxruntime is not installed.
    """
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "check_onnx runs the file in ONNX Runtime: pip install onnxruntime"
        ) from err
    batch = _inputs(inputs)
    fed = batch if onnx_inputs is None else _inputs(onnx_inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), fed, strict=True)}
    got = session.run(None, feeds)
    training = model.training
    device = next(model.parameters()).device
    try:
        expected = _run(model.eval(), tuple(t.to(device) for t in batch))
    finally:
        model.train(training)
    return max(
        float(np.abs(g - e.detach().cpu().numpy()).max(initial=0.0))
        for g, e in zip(got, expected, strict=True)
    )
