"""Print docs/transformers.md's examples from real compiles of the zoo ViT: one attention block and
MLP of its integer graph (integer-only kernels, twin-uniform codes) and its report summary, with and
without float islands (calibration: 512 Fashion-MNIST training images, report on 256 test images).

    python tools/doc_vit.py > /tmp/vit.txt
"""
from __future__ import annotations

import datetime as dt

import torch

import fxq
from fxq import data, zoo

SUMMARY_KEYS = ("target", "layers with weights", "MACs per sample", "activation x activation MACs per sample",
                "rescales", "float islands", "output SQNR dB")


def block(text: str, first: str, last: str) -> str:
    """The IR lines from the one starting with %first to the one starting with %last."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"%{first} "))
    stop = next(i for i, line in enumerate(lines) if line.startswith(f"%{last} "))
    return "\n".join([lines[0], "..."] + lines[start:stop + 1] + ["..."])


def main() -> None:
    torch.manual_seed(0)
    train_x, _ = data.load_fashion_mnist("train")
    calib = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:512]]
    test_x, _ = data.load_fashion_mnist("test")
    model = zoo.load("vit")
    print(f"# {dt.date.today().isoformat()}, tools/doc_vit.py")
    print(">>> qm = fxq.compile(vit, calib, search='hessian'); print(qm.ir)")
    qm = fxq.compile(model, calib, search="hessian", progress=False)
    print(block(str(qm.ir), "blocks_0_norm1", "add_11"))
    rep = qm.report(test_x[:256])
    print(">>> print(qm.report(x))   # summary lines")
    print("\n".join(f"{k}: {rep.summary[k]}" for k in SUMMARY_KEYS))
    print(">>> qm = fxq.compile(vit, calib, search='hessian', float_islands='all')")
    qm = fxq.compile(model, calib, search="hessian", float_islands="all", progress=False)
    lines = [line for line in str(qm.ir).splitlines() if "float_island" in line][:3]
    print("\n".join(lines + ["..."]))
    rep = qm.report(test_x[:256])
    print("\n".join(f"{k}: {rep.summary[k]}" for k in ("float islands", "output SQNR dB")))


if __name__ == "__main__":
    main()
