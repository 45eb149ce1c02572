"""Compare two result JSON files number by number (a refactoring must reproduce committed results).

    python benchmarks/compare_results.py REFERENCE.json NEW.json [--rtol 1e-6]

Every number present in both files must agree within ``--rtol`` (relative) or ``--atol``
(absolute, for values near zero); strings and integers must be equal. Wall-clock fields
(``seconds``) and the temporary data path are ignored. Exits 1 and lists every difference
otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

IGNORED = {"seconds", "data"}


def differences(ref, new, rtol: float, atol: float, path: str = "", ignored: frozenset = frozenset()) -> list[str]:
    out: list[str] = []
    if isinstance(ref, dict) and isinstance(new, dict):
        for key in sorted(set(ref) | set(new)):
            if key in IGNORED or key in ignored:
                continue
            where = f"{path}.{key}" if path else key
            if key not in ref or key not in new:
                out.append(f"{where}: only in {'new' if key in new else 'reference'}")
                continue
            out += differences(ref[key], new[key], rtol, atol, where, ignored)
    elif isinstance(ref, list) and isinstance(new, list):
        if len(ref) != len(new):
            return [f"{path}: {len(ref)} vs {len(new)} entries"]
        for i, (a, b) in enumerate(zip(ref, new, strict=True)):
            out += differences(a, b, rtol, atol, f"{path}[{i}]", ignored)
    elif isinstance(ref, float) or isinstance(new, float):
        a, b = float(ref), float(new)
        if not (math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))):
            rel = abs(a - b) / max(abs(a), abs(b), 1e-300)
            out.append(f"{path}: {a!r} vs {b!r} (relative {rel:.2e})")
    elif ref != new:
        out.append(f"{path}: {ref!r} vs {new!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference")
    parser.add_argument("new")
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of numbers")
    parser.add_argument("--atol", type=float, default=1e-12, help="absolute tolerance (numbers near zero)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="a key not to compare (repeatable), e.g. describe after a wording change")
    args = parser.parse_args(argv)
    with open(args.reference) as f:
        ref = json.load(f)
    with open(args.new) as f:
        new = json.load(f)
    found = differences(ref, new, args.rtol, args.atol, ignored=frozenset(args.ignore))
    for line in found:
        print(f"{args.new}: {line}")
    if not found:
        print(f"{args.new}: same as {args.reference} (rtol {args.rtol:g})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
