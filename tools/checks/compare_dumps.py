"""Compare two dump_ir.py outputs: non-JSON text byte for byte; saved IR JSON as parsed objects, with a
node's ``src`` read from either the node or (files written before Node.src) its attrs, and attributes at
their default left out.

    python tools/checks/compare_dumps.py OLD.txt NEW.txt
"""
import sys
import json
def split(path):
    s = open(path).read()
    dec = json.JSONDecoder()
    docs, rest, i = [], [], 0
    while True:
        j = s.find('{\n "format": "fxq-ir"', i)
        if j < 0:
            rest.append(s[i:]); break
        rest.append(s[i:j])
        doc, end = dec.raw_decode(s, j)
        docs.append(doc); i = end
    return docs, rest
def norm(doc):
    for n in doc["nodes"]:
        src = n.pop("src", None) or n["attrs"].pop("src", None)
        n["src"] = src
        n["attrs"] = {k: v for k, v in n["attrs"].items() if not (k in ("x_zp", "a_zp", "b_zp") and v == 0) and not (k == "w_full_range" and v is False) and not (k=="approximate" and v=="none")}
    return doc
a, ra = split(sys.argv[1]); b, rb = split(sys.argv[2])
print(len(a), len(b), "non-JSON text identical:", ra == rb)
print("JSON equal after normalising src/default attrs:", [norm(x) == norm(y) for x, y in zip(a, b)])
