import math

import numpy as np
import pandas as pd
import pytest

from rsd_bench.metrics import block_efficiency, mbsu, token_rate


def test_block_efficiency_scalar():
    assert block_efficiency(10, 4) == pytest.approx(2.5)
    assert isinstance(block_efficiency(10, 4), float)
    assert block_efficiency(7, 7) == 1.0  # AR: one token per call


def test_block_efficiency_zero_zero_is_nan():
    assert math.isnan(block_efficiency(0, 0))


def test_block_efficiency_series_and_array():
    s = block_efficiency(pd.Series([10, 6], index=["a", "b"]), pd.Series([4, 3], index=["a", "b"]))
    assert isinstance(s, pd.Series)
    assert list(s.index) == ["a", "b"]
    assert s.tolist() == pytest.approx([2.5, 2.0])
    a = block_efficiency(np.array([10, 9]), 3)
    assert isinstance(a, np.ndarray)
    assert a.tolist() == pytest.approx([10 / 3, 3.0])


@pytest.mark.parametrize("tokens,calls", [(5, 0), (-1, 3), (3, -1), (np.array([1, 2]), np.array([1, 0]))])
def test_block_efficiency_errors(tokens, calls):
    with pytest.raises(ValueError):
        block_efficiency(tokens, calls)


def test_block_efficiency_nan_propagates():
    out = block_efficiency(pd.Series([10.0, np.nan]), pd.Series([4, 2]))
    assert out.iloc[0] == 2.5 and math.isnan(out.iloc[1])


def test_mbsu_by_hand():
    # c = 1e8 / 7e9 = 1/70; 1 + 5/70 = 75/70; 2.5 * 70 / 75 = 2.333...
    assert mbsu(2.5, 1e8, 7e9, 5) == pytest.approx(2.5 * 70 / 75)
    assert mbsu(2.5, 1e8, 7e9, 5) == pytest.approx(7 / 3)


def test_mbsu_ar_depth_zero_is_block_efficiency():
    assert mbsu(1.0, 0, 7e9, 0) == 1.0
    assert mbsu(1.7, 1e8, 7e9, 0) == 1.7


def test_mbsu_series():
    out = mbsu(pd.Series([2.0, 3.0]), 1e9, pd.Series([1e10, 1e10]), pd.Series([2, 4]))
    assert out.tolist() == pytest.approx([2.0 / 1.2, 3.0 / 1.4])


@pytest.mark.parametrize("args", [(2.0, 1e8, 0, 3), (2.0, 1e8, -1, 3), (2.0, -1, 7e9, 3),
                                  (2.0, 1e8, 7e9, -1), (-0.5, 1e8, 7e9, 2)])
def test_mbsu_errors(args):
    with pytest.raises(ValueError):
        mbsu(*args)


def test_token_rate():
    assert token_rate(100, 4.0) == 25.0
    assert math.isnan(token_rate(0, 0.0))
    out = token_rate(pd.Series([10, 30]), pd.Series([2.0, 3.0]))
    assert out.tolist() == [5.0, 10.0]


@pytest.mark.parametrize("tokens,secs", [(5, 0.0), (-1, 1.0), (1, -1.0)])
def test_token_rate_errors(tokens, secs):
    with pytest.raises(ValueError):
        token_rate(tokens, secs)
