"""Write docs/maintainers/ir_ops.md, the IR op table, from fxq.ops (tests/test_ops.py checks it is current).

    python tools/doc_ops.py            # rewrite the file
    python tools/doc_ops.py --check    # exit 1 if the file differs from the code
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fxq.ops import KIND_PROPERTIES, table

DOC = Path(__file__).resolve().parent.parent / "docs" / "maintainers" / "ir_ops.md"


def render() -> str:
    lines = ["# IR ops", "",
             "Generated from `fxq/ops` by `python tools/doc_ops.py`; do not edit by hand. Each op is one spec",
             "class that owns its attributes, verifier rule, printed form, reference kernel and ONNX form",
             "(see [adding an op](../contributing.md#adding-an-ir-op)). Kind properties, read by the verifier,",
             "the backends and the report instead of op-name lists: " + ", ".join(f"`{k}`" for k in KIND_PROPERTIES) + ".",
             "", "| op | what it does | attributes (= default) | kinds | module |", "|---|---|---|---|---|"]
    for r in table():
        attrs = ", ".join(f"`{a}`" for a in r["attrs"]) or "-"
        kinds = ", ".join(r["kinds"]) or "-"
        lines.append(f"| `{r['op']}` | {r['doc']} | {attrs} | {kinds} | `{r['module']}` |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    text = render()
    if ap.parse_args().check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is out of date: run python tools/doc_ops.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
