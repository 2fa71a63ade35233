"""requant: an int32 accumulator -> narrow codes by a shift (per channel), round, saturate; on dyadic
targets an integer multiplier first. Its ONNX form is emitted together with the accumulator it reads."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Attrs, OpSpec
from .checks import NARROW, acc_fits, multiplier_ok, rounding_ok, same_step, shift_ok
from .kernels import rescale
from .text import frac_text


@dataclass(frozen=True, kw_only=True)
class RequantAttrs(Attrs):
    shift: int | tuple              # frac_in - frac_out (per channel); with a multiplier, its n
    rounding: str
    multiplier: int | tuple | None = None   # dyadic targets: acc * M >> n


def rescale_text(n, args: list[str]) -> list[str]:
    """The tail every rescaling op prints: (x multiplier) >> shift rounding (+zp) clamp[lo,hi]."""
    a = n.attrs
    if getattr(a, "multiplier", None) is not None:
        args.append(f"x{frac_text(a.multiplier)}")
    args.append(f">>{frac_text(a.shift)} {a.rounding}")
    if n.out.zp:
        args.append(f"+{n.out.zp}")
    args.append(f"clamp[{n.out.lo},{n.out.hi}]")
    return args


class Requant(OpSpec):
    name = "requant"
    doc = "int32 -> narrow codes: (multiply,) shift (per channel), round, clamp"
    Attrs = RequantAttrs
    requantizing = True

    def verify(self, n, ins, chk, ctx):
        a = n.attrs
        chk(len(ins) == 1 and ins[0].dtype == "int32", "requant takes an int32 accumulator")
        chk(n.out.dtype in NARROW, f"requant must produce narrow codes, not {n.out.dtype}")
        rounding_ok(chk, a.rounding)
        if a.multiplier is not None:
            multiplier_ok(chk, a.multiplier, a.shift, ins[0].step / n.out.step, ins[0].max_abs)
            return
        same_step(chk, ins[0], n.out)
        shift_ok(chk, a.shift, ins[0].frac_array - int(n.out.frac))
        left = -np.minimum(np.asarray(a.shift), 0)
        acc_fits(chk, ins[0].max_abs * (2 ** np.max(left)), None, "a left-shifted accumulator")

    def text(self, n, args, types):
        return rescale_text(n, args)

    def run(self, n, acc, t=None):
        return rescale(n, acc)

    def emit(self, b, n):
        acc = b.g.node(n.inputs[0])
        acc.spec.emit_requantized(b, acc, n)
