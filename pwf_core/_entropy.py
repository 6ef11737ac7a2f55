"""Entropy coding of index streams: constriction's ANS coder over their empirical distribution.

A compressed model's indices (each weight's shared value, or 2DGBNN's Gaussian) are coded as
one stream with a categorical model whose probabilities are the symbols' counts, which the file
stores next to the coded words. Asymmetric numeral systems reach within a fraction of a percent
of ``N H`` bits on streams this long; the coder is constriction's (Rust, well kept, used by
learned-compression research), not one of ours.
"""

from __future__ import annotations

import math
import zlib

import constriction
import numpy as np
import torch

from pwf_core.errors import CompressedFileError

CODER = "constriction-ans-categorical"


def symbol_counts(symbols: torch.Tensor, num_symbols: int) -> torch.Tensor:
    """How often each of ``0 .. num_symbols - 1`` occurs in ``symbols`` (int64)."""
    return torch.bincount(symbols.flatten().long(), minlength=num_symbols)


def entropy_bytes(counts: torch.Tensor) -> int:
    """``ceil(N H / 8)``: the fewest bytes ``N = counts.sum()`` symbols can be coded in."""
    present = counts[counts > 0].double()
    p = present / present.sum()
    bits = float(-(p * torch.log2(p)).sum()) * float(present.sum())
    return math.ceil(bits / 8)


def _model(counts: torch.Tensor) -> constriction.stream.model.Categorical:
    probabilities = counts.double().numpy()
    # perfect=False: constriction's fast, deterministic quantisation; every symbol keeps a
    # nonzero probability, so any symbol in range can be coded.
    return constriction.stream.model.Categorical(probabilities / probabilities.sum(), perfect=False)


def checksum(symbols: np.ndarray) -> int:
    """CRC-32 of a symbol stream, so that a decoder that disagrees with the encoder is caught."""
    return zlib.crc32(np.ascontiguousarray(symbols, dtype=np.int32).tobytes())


def encode(symbols: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The ANS words (uint32) of ``symbols`` under the distribution ``counts``, and the
    symbols' checksum."""
    flat = symbols.flatten().to(torch.int32).numpy()
    coder = constriction.stream.stack.AnsCoder()
    if len(flat):
        coder.encode_reverse(flat, _model(counts))
    words = coder.get_compressed()
    return torch.from_numpy(words.astype(np.uint32, copy=False)), checksum(flat)


def decode(words: torch.Tensor, counts: torch.Tensor, expected_crc: int) -> torch.Tensor:
    """The ``counts.sum()`` symbols (int64) coded in ``words``.

    Raises:
        CompressedFileError: when the words do not decode to what was encoded.
    """
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    try:
        coder = constriction.stream.stack.AnsCoder(words.numpy().astype(np.uint32, copy=False))
        symbols = coder.decode(_model(counts), total)
    except (ValueError, RuntimeError, OverflowError) as err:
        raise CompressedFileError(f"the coded indices do not decode ({err})") from None
    if checksum(symbols) != expected_crc:
        raise CompressedFileError("the coded indices decode to other values than were saved")
    return torch.from_numpy(symbols.astype(np.int64))
