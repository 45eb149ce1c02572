"""Compare two calibration outputs: same profile content, same tensors (bit for bit), same report bytes.

    python benchmarks/compare_profiles.py REFERENCE_DIR NEW_DIR

Both directories hold a profile (``minicache_config.yaml``, any format version this code reads) with
its sidecar and report. The profiles are loaded with this checkout's code and compared as data
(``to_dict()``, the profile's own provenance included) and their tensors bit for bit, so a reference
written in an older format still compares; the report (Markdown and PNGs) is compared byte for
byte. Exits 1 and lists every difference otherwise.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from minicache.profile import PROFILE_FILENAME, MergeProfile

REPORT_FILES = ("minicache_report.md", "minicache_groups.png", "minicache_search.png", "minicache_similarity.png")


def differences(ref_dir: pathlib.Path, new_dir: pathlib.Path) -> list[str]:
    out = []
    ref, new = MergeProfile.load(ref_dir), MergeProfile.load(new_dir)
    a, b = ref.to_dict(), new.to_dict()
    a.pop("producer", None)
    b.pop("producer", None)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"profile {key}: {a.get(key)!r} vs {b.get(key)!r}")
    ta, tb = ref.tensors, new.tensors
    names_a = [] if ta is None else ta.names()
    names_b = [] if tb is None else tb.names()
    if names_a != names_b:
        out.append(f"tensors: {names_a} vs {names_b}")
    else:
        for name in names_a:
            x, y = ta[name], tb[name]
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                worst = float((x.double() - y.double()).abs().max()) if x.shape == y.shape else float("nan")
                out.append(f"tensor {name}: not bit-identical (largest difference {worst:.3g})")
    for name in REPORT_FILES:
        fa, fb = ref_dir / name, new_dir / name
        if fa.is_file() != fb.is_file():
            out.append(f"{name}: only in {'new' if fb.is_file() else 'reference'}")
        elif fa.is_file() and fa.read_bytes() != fb.read_bytes():
            out.append(f"{name}: bytes differ")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=pathlib.Path)
    parser.add_argument("new", type=pathlib.Path)
    args = parser.parse_args(argv)
    found = differences(args.reference, args.new)
    for line in found:
        print(f"{args.new}: {line}")
    if not found:
        print(f"{args.new}: same profile, tensors (bit for bit) and report as {args.reference} "
              f"({PROFILE_FILENAME} format {MergeProfile.load(args.new).format_version})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
