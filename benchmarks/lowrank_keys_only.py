"""Keys low rank, values exact: a hand-made profile to see what compressing keys alone buys.

On SmolLM2 a low-rank basis keeps keys at an eighth of their width with a small restore error, while
values lose a quarter to a third of their energy at a quarter of theirs
(``benchmarks/results/lowrank-cpu/probe.md``). The search pairs keys and values at one error level,
so it never stores keys at a low rank beside exact values. This writes such profiles (every listed
layer a group of one: ``keys: lowrank``, ``values: exact``), bases fitted on the shipped profile's
calibration data, to be scored with ``minicache-eval --compare``.

    .venv/bin/python benchmarks/lowrank_keys_only.py --layers 0-29 --rank 8 --out /tmp/keys-r8
"""

from __future__ import annotations

import argparse

from minicache.calibrate.api import read_calibration_data
from minicache.calibrate.capture import prefill_batches
from minicache.data import token_windows
from minicache.methods import get_method
from minicache.methods.base import tensor_name
from minicache.methods.lowrank import SecondMoments
from minicache.model_spec import ModelSpec
from minicache.models import load_model
from minicache.profile import Defaults, MergeGroup, MergeProfile, ModelFingerprint
from minicache.runtime.rope import RopeAngles


def layer_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="profiles/smollm2-135m-instruct/calibration-data.jsonl")
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--layers", default="0-29", help="layers whose keys are stored low rank, e.g. 0-29 or 2-7,10")
    parser.add_argument("--rank", type=int, default=8, help="coefficients per token and KV head (joint basis)")
    parser.add_argument("--heads", default="joint", choices=["joint", "each"])
    parser.add_argument("--basis", default="pca", choices=["pca", "query"],
                        help="key bases by PCA, or weighted by the calibration queries (minicache.methods.moments)")
    parser.add_argument("--pre-rope", action="store_true",
                        help="bases fitted on keys with RoPE removed, stored so (pre_rope: true)")
    parser.add_argument("--group-size", type=int, default=1,
                        help="layers sharing one set of key coefficients (groups of adjacent layers)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    spec = ModelSpec.from_config(model)
    defaults = Defaults()
    windows = token_windows(read_calibration_data(args.data), tokenizer, args.max_length,
                            max_windows=args.num_samples, spread=True)
    stat = SecondMoments(spec.num_layers, spec.kv_heads, spec.head_dim, max_offset=args.group_size - 1)
    rope = RopeAngles.of_model(model) if args.pre_rope else None
    for _, _, kv in prefill_batches(model, windows, desc="second moments",
                                    on_queries=lambda layer, q: stat.add_queries(layer, q, defaults.sink_tokens)):
        if rope is not None:  # calibration windows start at position 0
            kv = [(rope.remove(k, 0), v) for k, v in kv]
        stat.add(kv, defaults.sink_tokens)
    lowrank = get_method("lowrank")
    keys = defaults.settings("lowrank", rank=args.rank, heads=args.heads, basis=args.basis, pre_rope=args.pre_rope)
    values = defaults.settings("exact")
    groups, tensors = [], {}
    chosen = layer_list(args.layers)
    for first in range(0, len(chosen), args.group_size):
        layers = tuple(chosen[first : first + args.group_size])
        label = f"{layers[0]}-{layers[-1]}"
        fitted = lowrank.fit(stat, layers)
        for local, t in lowrank.tensors_for(keys.params, fitted["keys"]).items():
            tensors[tensor_name(local, label, "keys")] = t
        groups.append(MergeGroup(layers, keys, values))
    profile = MergeProfile(groups=tuple(groups), defaults=defaults, model=ModelFingerprint.from_spec(spec),
                           tensors=tensors)
    path = profile.save(args.out)
    where = "pre-RoPE" if args.pre_rope else "post-RoPE"
    print(f"keys lowrank rank {args.rank} ({args.heads}, {args.basis}, {where}, groups of {args.group_size}), "
          f"values exact, layers {args.layers}: {path}")


if __name__ == "__main__":
    main()
