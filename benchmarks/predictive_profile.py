"""Build a ``predictive_residual`` profile for SmolLM2 (issue 18, item 0): every layer in groups of k.

Fits each member's linear prediction from the member below on calibration windows (ridge on streamed
second moments, :func:`minicache.methods.predictive.fit_predictors`) and writes a profile whose
groups cover layers 0..L−1 with a quantized cache (KIVI, per-token residual groups of
``--group-size`` channels). The search does not choose this method yet: this script is how its
profiles are made until it does.

    .venv/bin/python benchmarks/predictive_profile.py --data calib.jsonl --members 3 --bits 3 --out DIR
    .venv/bin/python benchmarks/predictive_profile.py --data calib.jsonl --members 3,5 --bits 3 --out DIR/k{members}

Several ``--members`` share one capture; ``{members}`` in ``--out`` is replaced by each.
"""

from __future__ import annotations

import argparse

import torch

from minicache.calibrate.capture import prefill_batches
from minicache.data import read_samples, token_windows
from minicache.methods import get_method
from minicache.methods.base import tensor_name
from minicache.methods.lowrank import SecondMoments
from minicache.models import load_model
from minicache.profile import Defaults, MergeGroup, MergeProfile, MergeSettings, ModelFingerprint, Quantization


def partition(num_layers: int, members: int, first: int = 0) -> list[tuple[int, ...]]:
    """Layers ``first..num_layers-1`` in runs of ``members`` (a last run of one joins the one before)."""
    runs = [tuple(range(s, min(s + members, num_layers))) for s in range(first, num_layers, members)]
    if len(runs) > 1 and len(runs[-1]) == 1:
        runs[-2] = runs[-2] + runs.pop()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="calibration JSONL (one {'text': ...} per line)")
    parser.add_argument("--members", default="3", help="layers per group (k); several: comma-separated")
    parser.add_argument("--first-layer", type=int, default=0, help="layers below it stay plain (quantized)")
    parser.add_argument("--heads", choices=("joint", "each"), default="joint")
    parser.add_argument("--weight-dtype", choices=("float16", "float32"), default="float16",
                        help="storage of the prediction maps (counted in the memory report)")
    parser.add_argument("--free-keys", dest="key_rope", action="store_false",
                        help="keys: a free map (fails past the calibration windows' positions) instead of one "
                             "that commutes with RoPE")
    parser.add_argument("--no-rotate", action="store_true", help="store residuals unrotated")
    parser.add_argument("--bits", type=int, default=3, help="code width of keys and of values")
    parser.add_argument("--value-bits", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--data-label", default=None,
                        help="what to call the data in the profile (default: --data)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    config = model.config
    layers, heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    windows = token_windows(read_samples(args.data), tokenizer, args.max_length, args.num_samples, spread=True)
    stat = SecondMoments(layers, heads, head_dim, max_offset=1)
    with torch.no_grad():
        for _, _, kv in prefill_batches(model, windows, batch_size=4, desc="second moments"):
            stat.add(kv, sink_tokens=1)

    for members in (int(m) for m in args.members.split(",")):
        out = args.out.replace("{members}", str(members))
        write_profile(stat, members, args, config, int(windows.shape[0]), int(windows.numel()), out)


def write_profile(stat: SecondMoments, members: int, args, config, windows: int, tokens: int, out: str) -> None:
    method = get_method("predictive_residual")
    params = method.params({"heads": args.heads, "rotate": not args.no_rotate})
    settings = MergeSettings(params=params, method=method.name, gamma=0.0)
    # keys: a map that commutes with RoPE, unless asked otherwise (a free one fails past the calibrated positions)
    key_params = params
    if args.key_rope:
        key_params = method.params({"heads": "joint", "rotate": not args.no_rotate, "rope": True})
    key_settings = MergeSettings(params=key_params, method=method.name, gamma=0.0)
    groups, tensors = [], {}
    for run in partition(config.num_hidden_layers, members, args.first_layer):
        group = MergeGroup(run, key_settings, settings)
        groups.append(group)
        fitted = method.fit(stat, run)
        for component, component_params in (("keys", key_params), ("values", params)):
            for local, tensor in method.tensors_for(component_params, fitted[component]).items():
                if local == "weight" and args.weight_dtype == "float16":
                    tensor = tensor.half()
                tensors[tensor_name(local, group.label, component)] = tensor
    quant = Quantization(bits=args.bits, value_bits=args.value_bits, group_size=args.group_size, scheme="kivi")
    profile = MergeProfile(
        groups=tuple(groups), defaults=Defaults(gamma=0.0), model=ModelFingerprint.from_config(config),
        tensors=tensors, quantization=quant,
        calibration={"predictive": {"data": args.data_label or args.data, "windows": windows, "tokens": tokens,
                                    "members": members, "heads": args.heads}},
    )
    print(profile.describe())
    print("saved", profile.save(out, overwrite=True))


if __name__ == "__main__":
    main()
