"""``pwf export``: a compressed model as ONNX, checked in ONNX Runtime against pwf's logits."""

from __future__ import annotations

import argparse
from pathlib import Path

from pwf_core.errors import CheckpointError
from pwf_flows.commands.failures import one_line

# Input sides of the datasets whose images have one size, for a file whose architecture
# records none (pwf's runs record the dataset's; a spec written by hand may leave it out).
_NATIVE_SIDES = {"digits": 8, "mnist": 28, "cifar10": 32}

_EXAMPLE_BATCH = 8


def _input_side(img_size: int | None, config: dict, path: Path) -> int:
    if img_size is not None:
        return img_size
    data = config.get("data") or {}
    name = data.get("name", "digits")
    side = data.get("img_size", 224) if name == "imagefolder" else _NATIVE_SIDES.get(name)
    if side is None:
        raise CheckpointError(
            f"'{path}' records no input size; export it from Python with "
            "pwf_core.export_onnx(model, path, example_input)"
        )
    return int(side)


def export_command(args: argparse.Namespace) -> int:
    """``pwf export``: a compressed model as ONNX, run in ONNX Runtime against pwf's logits.

    A file that is not a finished compressed model of a registered or timm architecture (a
    step checkpoint, a truncated or corrupted file, one saved from the user's own class) ends
    in one line and exit 2 before anything is written.
    """
    from pwf_core.data import recorded_contract
    from pwf_core.export import load_compressed, read_header
    from pwf_core.models import ModelSpec
    from pwf_core.onnx_export import INPUT_METADATA, check_onnx, export_onnx

    out = args.out or args.file.with_suffix(".onnx")
    if out.is_dir():
        raise CheckpointError(f"--out: '{out}' is a folder; name the .onnx file to write")
    header = read_header(args.file)
    if header.get("model") is None:
        raise CheckpointError(
            f"'{args.file}' was saved from your own class {header.get('model_class')}, which "
            "pwf cannot rebuild: in Python, load it with pwf_core.load_compressed(path, "
            "model=MyNet()) and write it with pwf_core.export_onnx(model, path, example_input)"
        )
    try:
        contract = recorded_contract(header)
        if args.preprocess and contract is None:
            raise CheckpointError(
                f"'{args.file}' records no input contract (an older pwf wrote it), so there is "
                "no normalisation to put into the graph: export it without --preprocess and "
                "normalise inputs as its dataset's reader in pwf_core/data/ does"
            )
        spec = ModelSpec(**header["model"])
        model = load_compressed(args.file)
        raw, example = _example_inputs(spec, contract, header, args.file)
        result = export_onnx(model, out, example, contract=contract, preprocess=args.preprocess)
    except (ValueError, TypeError, KeyError) as err:
        # a header that parses but describes no model this pwf can load and run (including
        # NotCompressedError: free weights), said as one line rather than a traceback
        problem = f"it has no {err.args[0]!r}" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"'{args.file}' cannot be exported: {one_line(problem)}") from None
    difference = check_onnx(result.path, model, example, raw if args.preprocess else None)
    print(
        f"pwf export: {result.path}: {result.file_bytes:,} bytes (float ONNX "
        f"{result.float_bytes:,} bytes, {result.ratio:.1f}x smaller); "
        f"{len(result.shared_tensors)} shared tensors on {result.codebook_size} values "
        f"({result.index_dtype} indices); max |logit difference| vs pwf {difference:.2g}\n"
        + (
            f"  input: {contract.describe(args.preprocess)} (in the file's metadata, "
            f"key {INPUT_METADATA!r})"
            if contract is not None
            else "  input: not recorded (an older pwf wrote the file): normalise as its "
            "dataset's reader in pwf_core/data/ does"
        )
    )
    return 0


def _example_inputs(spec, contract, header: dict, path: Path) -> tuple:
    """Raw pixels across the contract's range and the model's input made of them (without a
    contract: values in [0, 1], the model's input as is)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    if contract is not None:
        low, high = contract.raw_range
        raw = low + (high - low) * torch.rand(_EXAMPLE_BATCH, *contract.shape, generator=generator)
        return raw, contract.normalise(raw)
    side = _input_side(spec.img_size, header.get("config") or {}, path)
    example = torch.rand(_EXAMPLE_BATCH, spec.in_chans, side, side, generator=generator)
    return example, example
