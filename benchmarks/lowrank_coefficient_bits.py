"""Probe: how much packing low-rank coefficients at 4/3/2 bits adds to a profile's restore error.

    python benchmarks/lowrank_coefficient_bits.py --profile profiles/smollm2-135m-instruct-lowrank

For every low-rank component of the profile, on ``--tokens`` tokens of Python source (text no profile
was calibrated on): the relative squared restore error of the group's members with the coefficients
as computed ("base"), packed as a KIVI cache packs them ("plain": the ``vectors`` role, per token),
packed so after dividing each coefficient by its standard deviation over the tokens ("white"), and
packed per channel over groups of 128 tokens ("per-chan": KIVI's ``keys`` role). A width that cannot
pack the rank into whole bytes prints "-".
"""

from __future__ import annotations

import argparse
import pathlib

import torch

from minicache import MergeProfile
from minicache.methods import get_method
from minicache.models import load_model
from minicache.quant import get_quantizer

SOURCES = ("argparse.py", "dataclasses.py", "textwrap.py", "difflib.py")
GROUP_SIZE = 128  # KIVI's default, as in the quantized profiles


def relative_error(method, settings, tensors, xs, coefficients) -> float:
    fields = {"coefficients": coefficients}
    restored = [method.decode(settings.params, fields, m, tensors, torch.float32) for m in range(len(xs))]
    return float(sum((r - x).square().sum() for r, x in zip(restored, xs, strict=True))
                 / sum(x.square().sum() for x in xs))


def round_trip(x: torch.Tensor, role: str, bits: int) -> torch.Tensor:
    """``x`` packed by KIVI as the cache packs a field of ``role``, and unpacked."""
    return get_quantizer("kivi").quantize(x, role, bits, GROUP_SIZE).dequantize(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="profiles/smollm2-135m-instruct-lowrank")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    profile = MergeProfile.load(args.profile)
    text = "".join((pathlib.Path("/usr/lib/python3.11") / name).read_text() for name in SOURCES)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    method = get_method("lowrank")
    for group in profile.groups:
        for c, component in enumerate(("keys", "values")):
            settings = getattr(group, component)
            if settings.method != "lowrank":
                continue
            tensors = profile.tensors_of(group, component)
            xs = [(cache.layers[layer].keys, cache.layers[layer].values)[c] for layer in group.layers]
            coefficients = method.encode(settings.params, xs, tensors).fields["coefficients"]
            sigma = coefficients.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
            row = [f"{list(group.layers)} {component[0]} {settings.params.summary():22s} base "
                   f"{relative_error(method, settings, tensors, xs, coefficients):.4f}"]
            for bits in (4, 3, 2):
                try:
                    variants = {
                        "plain": round_trip(coefficients, "vectors", bits),
                        "white": round_trip(coefficients / sigma, "vectors", bits) * sigma,
                        "per-chan": round_trip(coefficients, "keys", bits),
                    }
                except ValueError:
                    row.append(f"{bits}b: -")
                    continue
                row.append(f"{bits}b: " + " ".join(
                    f"{name} {relative_error(method, settings, tensors, xs, q):.4f}" for name, q in variants.items()))
            print(" | ".join(row))


if __name__ == "__main__":
    main()
