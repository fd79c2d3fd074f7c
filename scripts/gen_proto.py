"""Generate Python code from proto/ into services/api/ (committed; a test checks staleness).

Run: python scripts/gen_proto.py [--out DIR]. grpc_tools emits absolute imports of the form
``from xds.v1 import x_pb2``; they are rewritten to ``services.api.xds.v1`` so the generated
package lives inside ours without touching sys.path.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    files = sorted(PROTO.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *[str(f) for f in files]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for py in sorted(out.rglob("*.py*")):
        text = py.read_text()
        text = re.sub(r"^from xds\.(\S+) import", r"from services.api.xds.\1 import", text, flags=re.M)
        py.write_text(text)
        written.append(py)
    for d in {p.parent for p in written} | {out / "xds"}:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "services" / "api")
    generate(ap.parse_args().out)
    sys.exit(0)
