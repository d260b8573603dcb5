"""The structure of an uplink: keys, shapes and dtypes as declared, against what the server sent.

Checked before any byte of a reply is decoded; ``Algorithm.check_uplink`` uses it (algorithms whose
uplink differs in shape from the downlink override that).
"""

from __future__ import annotations

from collections.abc import Mapping

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
