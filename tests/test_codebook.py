import itertools

import numpy as np
import pytest

from pwf_core.methods.pwfn.codebook import pow2_codebook


def plain_codebook(b: int, max_abs: float, order: int) -> list[float]:
    """The reference construction, written plainly: sums of `order` elements of P."""
    top = int(np.ceil(np.log2(max_abs)))
    powers = [0.0] + [2.0**k for k in range(-b, top)]
    sums = {sum(c) for c in itertools.combinations_with_replacement(powers, order)}
    sums = {s for s in sums if s <= max_abs}
    return sorted({-s for s in sums} | sums)


def test_order_one_is_plain_powers_of_two():
    book = pow2_codebook(b=3, max_abs=1.0, max_order=1)
    assert book.values.tolist() == [-0.5, -0.25, -0.125, 0.0, 0.125, 0.25, 0.5]
    assert set(book.orders.tolist()) == {1}


@pytest.mark.parametrize("b", [2, 5, 7])
@pytest.mark.parametrize("max_abs", [0.3, 0.5, 1.0, 1.7, 6.0])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_the_plain_construction(b, max_abs, order):
    book = pow2_codebook(b, max_abs, order)
    assert book.values.tolist() == plain_codebook(b, max_abs, order)
    assert np.all(np.abs(book.values) <= max_abs)
    assert np.all(book.grid() * 2.0**-b == book.values)  # all multiples of 2^-b


def test_orders_nest_and_record_the_lowest_order():
    book = pow2_codebook(b=4, max_abs=0.9, max_order=4)
    for order in range(1, 5):
        assert book.up_to(order).values.tolist() == plain_codebook(4, 0.9, order)
    assert book.orders[book.index_of(0.375)] == 2  # 0.25 + 0.125
    assert book.orders[book.index_of(0.4375)] == 3  # 0.25 + 0.125 + 0.0625
    assert book.orders[book.index_of(0.0)] == 1
    with pytest.raises(KeyError):
        book.index_of(0.3)
