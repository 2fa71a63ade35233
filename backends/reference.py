"""Reference backend: executes the integer IR in numpy, bit-exactly.

Codes travel as int64 arrays; each op's kernel is its spec's ``run`` in fxq.ops (fxq.ops.kernels holds
the exact-GEMM and rescale helpers they share).
"""
from __future__ import annotations

import numpy as np

from fxq.errors import InputError
from fxq.ir import Graph
from fxq.ops import OPS


def check_input_spec(g: Graph, shape: tuple, dtype) -> None:
    want = g.input_type.shape
    if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape)):
        dims = ", ".join("N" if d is None else str(d) for d in want)
        raise InputError(f"input '{g.input_name}' has shape {list(shape)}; this model takes [{dims}]")
    if g.input_type.dtype == "int64":
        if not np.issubdtype(np.dtype(dtype), np.integer):
            raise InputError(f"input '{g.input_name}' has dtype {np.dtype(dtype)}; this model takes integer token ids")
    elif not np.issubdtype(np.dtype(dtype), np.floating):
        raise InputError(f"input '{g.input_name}' has dtype {np.dtype(dtype)}; pass float values (they are quantized inside)")


def check_input(g: Graph, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    check_input_spec(g, x.shape, x.dtype)
    return x


def execute(g: Graph, x: np.ndarray, keep: bool = False) -> dict[str, np.ndarray]:
    """Run the graph; returns the output (float64) and, with ``keep``, every tensor's codes by name."""
    env = {g.input_name: check_input(g, x)}
    types = g.types()
    for node in g.nodes:
        missing = [i for i in node.inputs if i not in env]
        if missing:
            raise InputError(f"IR node %{node.name} reads {missing}, not yet computed")
        kernel = OPS[node.op]
        t = types[node.inputs[0]] if kernel.reads_input_type else None
        env[node.name] = kernel.run(node, *(env[i] for i in node.inputs), t=t)
    return env if keep else {g.output: env[g.output], "codes": env[g.output_codes().name]}


def run(g: Graph, x: np.ndarray) -> np.ndarray:
    return execute(g, x)[g.output]


def run_codes(g: Graph, x: np.ndarray) -> np.ndarray:
    """Integer codes of the tensor the graph dequantizes at its output."""
    return execute(g, x)["codes"]
