"""The shared main() of the scripts that generate a doc from code (gen_recipe_reference.py, gen_families_doc.py):
write the file, or with --check exit 1 and show the difference when it is stale."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Callable


def write_or_check(doc: str | None, out: Path, render: Callable[[], str], source: str, command: str) -> int:
    """`source` names what the doc is generated from ("schema", "grid"); `command` regenerates it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=out, help="the file to write or check (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 and show the difference if the file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current == text:
            print(f"{args.out} is up to date")
            return 0
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(args.out), source, lineterm="", n=0)
        print("\n".join(list(diff)[:40]))
        print(f"{args.out} is stale: the {source} changed; regenerate it with `{command}`", file=sys.stderr)
        return 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0
