"""Dump what a code change must not move: printed IR, report, saved IR JSON, the ONNX export's sha256
and reference codes, for zoo models on every target and the text encoder (integer-only and float
islands). Run it under two versions of fxq and compare with compare_dumps.py.

    python tools/checks/dump_ir.py OUT.txt [PATH_WITH_OTHER_FXQ]   # second arg: a folder holding an fxq/
"""
import sys, json, io, zipfile, hashlib
if len(sys.argv) > 2:
    sys.path.insert(0, sys.argv[2])
import numpy as np, torch
import fxq
print(fxq.__file__, file=sys.stderr)
sys.path.insert(0, "/work/main/tests")
from fxq import zoo
torch.manual_seed(0)
out = []
x = torch.rand(64, 1, 28, 28)
for name, target, kw in [("resnet", "shift-int", {}), ("mobilenetv2", "int8", {}), ("resnet", "dfp-cluster", {}),
                         ("vit", "shift-int", {}), ("vit", "shift-int", {"float_islands": "all"}),
                         ("mobilenetv2", "fixed-point8", {}), ("vit", "int8", {})]:
    m = zoo.load(name)
    qm = fxq.compile(m, x, target=target, progress=False, **kw)
    out.append(str(qm.ir))
    out.append(str(qm.report(x[:16])))
    p = f"/tmp/m_{name}_{target}.fxq"
    qm.save(p)
    with zipfile.ZipFile(p) as z:
        out.append(z.read("ir.json").decode())
    model = qm.export_onnx(f"/tmp/m_{name}_{target}.onnx")
    out.append(hashlib.sha256(open(f"/tmp/m_{name}_{target}.onnx", "rb").read()).hexdigest())
    out.append(str(np.asarray(qm.run(x[:8].numpy())).tobytes().hex()[:200]))
from fxq.zoo.text import TextEncoder, random_sentences
torch.manual_seed(0)
enc = TextEncoder().eval()
for isl in [(), "all"]:
    qm = fxq.compile(enc, random_sentences(64, seed=1), float_islands=isl, progress=False)
    out.append(str(qm.ir)); out.append(str(qm.report()))
    qm.save("/tmp/enc.fxq")
    with zipfile.ZipFile("/tmp/enc.fxq") as z:
        out.append(z.read("ir.json").decode())
    qm.export_onnx("/tmp/enc.onnx")
    out.append(hashlib.sha256(open("/tmp/enc.onnx", "rb").read()).hexdigest())
open(sys.argv[1], "w").write("\n".join(out))
