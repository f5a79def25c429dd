"""The ``tc:B`` transform codec's math (``kt_cache.transform_codec``): bit layout, quantisers, allocation, fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kt_cache.codecs import Codec
from kt_cache.transform_codec import (
    LEVELS,
    MISSING_FLAG,
    SortedColumns,
    TransformParams,
    allocate,
    fit_transform,
    lloyd_max,
)


def identity_params() -> TransformParams:
    """One cell, two channels, no rotation: coefficient 0 gets 2 bits (levels -3, -1, 1, 3), coefficient 1
    gets 1 bit (levels -1, 1)."""
    levels = np.zeros((2, LEVELS), np.float32)
    levels[0, :4], levels[1, :2] = [-3, -1, 1, 3], [-1, 1]
    arrays = {"mean": np.zeros((1, 2)), "spatial": np.eye(1), "basis": np.eye(2), "coef": np.array([0, 1]),
              "depth": np.array([2, 1]), "spread": np.ones(2), "levels": levels,
              "low": np.full(2, -100.0), "high": np.full(2, 100.0)}
    return TransformParams(arrays, Codec(transform=1))


def test_a_code_is_the_flag_byte_then_the_indices_packed_most_significant_bit_first():
    params = identity_params()
    maps = np.array([[[1.21, -0.64]], [[9.0, 4.0]], [[np.nan, 0.0]]], np.float32)   # roots 1.1, -0.8 | 3, 2
    codes = params.encode(maps)
    # map 0: index 2 (0b10) of the first, index 0 (0b0) of the second -> bits 100, padded: 0b1000_0000
    # map 1: index 3 (0b11), index 1 (0b1) -> bits 111: 0b1110_0000
    assert codes.tolist() == [[0, 0b1000_0000], [0, 0b1110_0000], [MISSING_FLAG, 0]]
    assert params.bits == 3 and params.code_bytes == 2
    decoded = params.decode(codes)
    assert decoded.shape == (3, 1, 1, 2)                                  # [maps, g, g, C]
    np.testing.assert_allclose(decoded[:2, 0, 0], [[1.0, -1.0], [9.0, 1.0]])   # levels squared, sign kept
    assert np.isnan(decoded[2]).all()


def test_lloyd_max_of_uniform_values_halves_the_range():
    values = (np.arange(10000) + 0.5)[:, None] / 10000
    levels, mse = lloyd_max(SortedColumns(values), 1, 30)
    np.testing.assert_allclose(levels[:, 0], [0.25, 0.75], atol=1e-3)
    assert mse[0] == pytest.approx(1 / 48, rel=1e-2)              # (1/2)^2 / 12 per half


def test_allocation_stays_within_the_budget_and_favours_the_larger_errors():
    error = np.array([[4.0, 1.0, 0.01], [1.0, 0.25, 0.0025], [0.25, 0.06, 0.0006], [0.06, 0.015, 0.0002]])
    for budget in range(0, 10):
        depth = allocate(error, budget)
        assert depth.sum() <= budget and (np.diff(depth) <= 0).all()
    assert allocate(error, 3).tolist() == [2, 1, 0]


@pytest.fixture(scope="module")
def relu_maps() -> np.ndarray:
    """Low-rank, non-negative maps ``[600, 4, 24]``: 6 factors, then a ReLU."""
    rng = np.random.default_rng(0)
    return np.maximum(rng.normal(size=(600, 6)) @ rng.normal(size=(6, 4 * 24)), 0).reshape(600, 4, 24).astype(np.float32)


def test_fitted_codec_error_falls_with_its_budget_and_codes_fit_it(relu_maps):
    fit = fit_transform(lambda: (relu_maps[s:s + 128] for s in range(0, len(relu_maps), 128)))
    cosines = []
    for budget in (1, 2, 4, 8, 16):
        params = fit.params(budget)
        codes = params.encode(relu_maps)
        assert codes.dtype == np.uint8 and codes.shape == (600, params.code_bytes) and params.code_bytes <= 4 * budget
        decoded = params.decode(codes).reshape(600, 4, 24)
        assert (decoded >= 0).all()                           # clipped to the fitted range: a ReLU map stays >= 0
        x, xh = relu_maps.reshape(-1, 24), decoded.reshape(-1, 24)
        keep = np.linalg.norm(x, axis=1) > 0
        cosines.append(float(((x * xh).sum(1)[keep] / (np.linalg.norm(x, axis=1) * np.linalg.norm(xh, axis=1))[keep]).mean()))
    assert cosines == sorted(cosines) and cosines[-1] > 0.99 and cosines[0] < 0.95
    torch_decoded = params.torch_decode(torch.from_numpy(codes[:5])).numpy()
    np.testing.assert_array_equal(torch_decoded, params.decode(codes[:5]))


def test_the_quantisers_sample_is_spread_evenly_over_every_block():
    from kt_cache.transform_codec import evenly_spread

    picked = np.concatenate([evenly_spread(s, 100, 3840, 2048) for s in range(0, 3800, 100)]
                            + [evenly_spread(3800, 40, 3840, 2048)])
    index = np.nonzero(picked)[0]
    assert len(index) == 2048 and index[0] < 2 and index[-1] > 3837 and np.diff(index).max() == 2
    assert evenly_spread(10, 5, 100, 2048).all()


def test_a_budget_that_codes_nothing_stores_the_flag_alone_and_decodes_the_mean_map():
    maps = np.maximum(np.random.default_rng(0).normal(size=(50, 1, 8)), 0).astype(np.float32)
    params = fit_transform(lambda: [maps]).params(1)        # one cell, one byte: the flag takes it
    codes = params.encode(maps)
    assert params.bits == 0 and codes.shape == (50, 1) and (codes == 0).all()
    decoded = params.decode(codes).reshape(50, 8)
    mean_root = (np.sqrt(maps)).mean(0).reshape(8)
    np.testing.assert_allclose(decoded, np.broadcast_to(mean_root ** 2, (50, 8)), rtol=1e-5)
