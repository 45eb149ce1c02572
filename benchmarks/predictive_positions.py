"""Does a predictive_residual profile predict as well at every position? Residual energy share by position band.

Encodes (unquantized) every group of a profile on 4,096-token windows of held-out text and prints, for
keys and values, the residual's share of the members' energy (members after the first) in bands of
1,024 positions. A free map fitted on post-RoPE keys of 1,024-token windows predicts only inside those
positions; a map that commutes with RoPE (``rope: true``) predicts alike everywhere.

    .venv/bin/python benchmarks/predictive_positions.py benchmarks/results/predictive-cpu/k10-3bit
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minicache.calibrate.capture import prefill_batches
from minicache.data import split_text, token_windows
from minicache.models import load_model
from minicache.profile import MergeProfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--data", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--band", type=int, default=1024)
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m", dtype="float32")
    profile = MergeProfile.load(args.profile)
    windows = token_windows(split_text(Path(args.data).read_text()), tok, args.length, 1)
    bands = [(max(1, a), a + args.band) for a in range(0, args.length, args.band)]
    with torch.no_grad():
        _, _, kv = next(prefill_batches(model, windows, batch_size=1, progress=False))
    for c, component in enumerate(("keys", "values")):
        share = {band: [0.0, 0.0] for band in bands}
        for group in profile.groups:
            settings = getattr(group, component)
            tensors = profile.tensors_of(group, component)
            xs = [kv[layer][c] for layer in group.layers]
            residual = settings.merge_method.encode(settings.params, xs, tensors).fields["residuals"]
            d = xs[0].shape[-1]
            for j in range(1, len(xs)):
                r = residual[..., j * d:(j + 1) * d]
                for a, b in bands:
                    share[(a, b)][0] += float(r[..., a:b, :].square().sum())
                    share[(a, b)][1] += float(xs[j][..., a:b, :].square().sum())
        cells = ", ".join(f"{a}-{b}: {n / e:.3f}" for (a, b), (n, e) in share.items())
        print(f"{component}: residual share of the energy by position: {cells}")


if __name__ == "__main__":
    main()
