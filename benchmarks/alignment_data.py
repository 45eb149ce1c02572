"""Write the calibration / evaluation text split used by benchmarks/results/alignment-cpu-*.md.

Debian's license texts, split by family so that no text (nor a near-copy of it, like LGPL-2 vs
LGPL-2.1) is on both sides: calibration = GPL-3, LGPL-2.1, GFDL-1.3, CC0-1.0; evaluation =
Apache-2.0, MPL-2.0, Artistic, MPL-1.1. Each file is cut into records of about 3,000 characters at
paragraph breaks (so the calibrator's seeded calibration / held-out split has many records).

    python benchmarks/alignment_data.py OUT_DIR   # writes OUT_DIR/calib.jsonl and OUT_DIR/eval.jsonl
"""

from __future__ import annotations

import json
import pathlib
import sys

LICENSES = pathlib.Path("/usr/share/common-licenses")
CALIBRATION = ("GPL-3", "LGPL-2.1", "GFDL-1.3", "CC0-1.0")
EVALUATION = ("Apache-2.0", "MPL-2.0", "Artistic", "MPL-1.1")


def records(name: str, size: int = 3000):
    text = (LICENSES / name).read_text()
    current = ""
    for paragraph in text.split("\n\n"):
        current += paragraph + "\n\n"
        if len(current) >= size:
            yield current
            current = ""
    if current.strip():
        yield current


def main(out: str) -> None:
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for filename, names in (("calib.jsonl", CALIBRATION), ("eval.jsonl", EVALUATION)):
        with open(out_dir / filename, "w") as handle:
            count = 0
            for name in names:
                for record in records(name):
                    handle.write(json.dumps({"text": record}) + "\n")
                    count += 1
        print(f"{out_dir / filename}: {count} records from {', '.join(names)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
