"""Speed metrics of speculative decoding, as pure functions.

All functions accept Python scalars, numpy arrays or pandas Series (broadcasting like numpy) and
return the same kind: a float for scalar inputs, a Series (index of the first Series argument)
if any argument is a Series, else a numpy array. NaN inputs propagate to NaN outputs; they are
not treated as errors. Nonsense inputs (negative counts or times, tokens without any target
call) raise ValueError.

Definitions (RSD paper, arXiv 2402.14160, Section "Experiments"):

* Block efficiency ``tau``: tokens produced per call of the target model::

      tau = new_tokens / target_calls

  The tokens of a block are the accepted draft tokens plus the one correction (or bonus) token
  that every target call yields, so ``1 <= tau <= L + 1`` for a draft tree of depth ``L``.
  Autoregressive decoding (AR) has ``tau = 1``.

* Memory-bound speed-up (MBSU): the speed-up over AR if every forward pass cost time
  proportional to the parameter count of the model that runs it::

      MBSU = tau / (1 + c * L),    c = draft_params / target_params

  where ``L`` (``depth``) is the number of *sequential* draft calls per block (the tree depth;
  the width of a tree level is free in this model). For AR, ``L = 0`` and MBSU = tau = 1.

* Token rate: generated tokens per second of (GPU-synchronised) decode wall clock::

      token_rate = new_tokens / seconds
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["block_efficiency", "mbsu", "token_rate"]


def _to_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, pd.Series):
        return x.to_numpy(dtype=float, na_value=np.nan)
    try:
        return np.asarray(x, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {x!r}") from exc


def _wrap(result: np.ndarray, *inputs: Any):
    """Return ``result`` in the kind of the inputs (float / Series / ndarray)."""
    for x in inputs:
        if isinstance(x, pd.Series):
            return pd.Series(np.broadcast_to(result, (len(x),)).copy(), index=x.index)
    if np.ndim(result) == 0:
        return float(result)
    return result


def _check_nonnegative(a: np.ndarray, name: str) -> None:
    with np.errstate(invalid="ignore"):
        if np.any(a < 0):
            raise ValueError(f"{name} must be >= 0, got a negative value")
    if np.any(np.isinf(a)):
        raise ValueError(f"{name} must be finite")


def _tokens_per(new_tokens, per, per_name: str, zero_message: str):
    """new_tokens / per, elementwise; 0/0 and NaN give NaN, tokens over 0 is an error."""
    n = _to_array(new_tokens, "new_tokens")
    d = _to_array(per, per_name)
    _check_nonnegative(n, "new_tokens")
    _check_nonnegative(d, per_name)
    n, d = np.broadcast_arrays(n, d)
    if np.any((d == 0) & (n > 0)):
        raise ValueError(zero_message)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(d > 0, n / np.where(d > 0, d, 1.0), np.nan)
    out = np.where(np.isnan(n) | np.isnan(d), np.nan, out)
    return _wrap(out, new_tokens, per)


def block_efficiency(new_tokens, target_calls):
    """Tokens produced per target call: ``new_tokens / target_calls``.

    The correction/bonus token of every call is counted in ``new_tokens``; AR gives 1.0.
    ``0 / 0`` (nothing generated, no call) gives NaN. Raises ValueError for negative inputs or
    for tokens generated with zero target calls.
    """
    return _tokens_per(new_tokens, target_calls, "target_calls",
                       "target_calls is 0 while new_tokens > 0: every token needs a target call")


def mbsu(block_eff, draft_params, target_params, depth):
    """Memory-bound speed-up: ``block_eff / (1 + c * depth)`` with ``c = draft_params / target_params``.

    ``depth`` is the number of sequential draft calls per block (draft length / tree depth L);
    ``depth = 0`` (AR) returns ``block_eff`` unchanged, whatever ``draft_params`` is.
    Raises ValueError for a non-positive ``target_params`` or negative inputs.
    """
    b = _to_array(block_eff, "block_eff")
    d = _to_array(draft_params, "draft_params")
    t = _to_array(target_params, "target_params")
    L = _to_array(depth, "depth")
    _check_nonnegative(b, "block_eff")
    _check_nonnegative(d, "draft_params")
    _check_nonnegative(L, "depth")
    with np.errstate(invalid="ignore"):
        if np.any(t <= 0) or np.any(np.isinf(t)):
            raise ValueError("target_params must be a positive, finite parameter count")
    cost = 1.0 + np.where(L == 0, 0.0, d / t * L)
    cost = np.where(np.isnan(L), np.nan, cost)
    out = b / cost
    return _wrap(out, block_eff, draft_params, target_params, depth)


def token_rate(new_tokens, seconds):
    """Generated tokens per second: ``new_tokens / seconds``.

    ``0 / 0`` gives NaN. Raises ValueError for negative inputs or tokens with zero seconds.
    """
    return _tokens_per(new_tokens, seconds, "seconds", "seconds is 0 while new_tokens > 0")
