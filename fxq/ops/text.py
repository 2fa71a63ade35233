"""Pieces of the printed IR that several ops share."""
from __future__ import annotations

SHORT_DTYPE = {"int8": "i8", "uint8": "u8", "int16": "i16", "uint16": "u16", "int32": "i32", "float32": "f32"}


def frac_text(frac) -> str:
    """A fractional length, or the range of a per-channel tuple of them."""
    if isinstance(frac, (tuple, list)):
        lo, hi = min(frac), max(frac)
        return str(lo) if lo == hi else f"{lo}..{hi}"
    return str(frac)


def pair_text(v) -> str:
    v = tuple(v)
    return str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))


def shape_text(a) -> str:
    return ",".join(map(str, a.shape))


def dtype_text(dtype) -> str:
    return SHORT_DTYPE.get(str(dtype), str(dtype))
