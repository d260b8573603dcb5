"""Checks on a client's reply before it may enter the average.

Each check returns ``None`` when the reply is fine, else a one-line reason that the server logs
with the client's identity. Structure (keys, shapes, dtypes) is checked from the arrays' declared
metadata before any bytes are decoded; decoding uses numpy without pickle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

Spec = tuple[tuple[int, ...], np.dtype]


def check_structure(declared: Mapping[str, Spec], expected: Mapping[str, Spec]) -> str | None:
    """Keys, shapes and dtypes of a reply against what the server sent."""
    missing = sorted(set(expected) - set(declared))
    if missing:
        return f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}"
    extra = sorted(set(declared) - set(expected))
    if extra:
        return f"unexpected keys {extra[:3]}{' ...' if len(extra) > 3 else ''}"
    for name, (shape, dtype) in expected.items():
        got_shape, got_dtype = declared[name]
        if tuple(got_shape) != tuple(shape):
            return f"{name}: shape {tuple(got_shape)}, expected {tuple(shape)}"
        if np.dtype(got_dtype) != np.dtype(dtype):
            return f"{name}: dtype {np.dtype(got_dtype)}, expected {np.dtype(dtype)}"
    return None


def check_values(
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None = None,
    max_update_norm: float = 0.0,
) -> str | None:
    """Finite values, and (when ``max_update_norm > 0``) ``||arrays - reference||_2`` within the bound."""
    for name, arr in arrays.items():
        if not np.isfinite(arr).all():
            return f"{name}: holds NaN or Inf"
    if max_update_norm > 0 and reference is not None:
        sq = sum(
            float(np.sum((a.astype(np.float64) - reference[n].astype(np.float64)) ** 2)) for n, a in arrays.items()
        )
        norm = sq**0.5
        if norm > max_update_norm:
            return f"update norm {norm:.4g} exceeds federation.max_update_norm={max_update_norm:.4g}"
    return None


def decode_checked(
    decoders: Mapping[str, Callable[[], np.ndarray]], declared: Mapping[str, Spec]
) -> tuple[dict[str, np.ndarray], str | None]:
    """Decode each array (its decoder must refuse pickled data) and hold it to its declared spec.

    An array's metadata (checked by ``check_structure``) and its bytes travel separately; a reply
    whose bytes do not decode, or decode to another shape or dtype than declared, is malformed.
    """
    out: dict[str, np.ndarray] = {}
    for name, decode in decoders.items():
        try:
            arr = decode()
        except Exception as err:  # numpy raises ValueError for pickled data; anything else is as bad
            return {}, f"{name}: bytes do not decode as a plain array ({type(err).__name__}: {err})"
        shape, dtype = declared[name]
        if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
            return {}, (
                f"{name}: bytes hold {np.dtype(arr.dtype)} {tuple(arr.shape)}, "
                f"declared {np.dtype(dtype)} {tuple(shape)}"
            )
        out[name] = arr
    return out, None
