"""The paper's layout (pairs from L/2) stored by the low-rank method at SLERP's bytes per token.

SLERP stores, per token and KV head of a pair, one direction (head_dim values) and two magnitudes:
``head_dim + 2`` values (bf16 stores the magnitudes in fp16, fp32 in fp32, so the count holds in
both). A low-rank pair at ``rank = head_dim + 2`` stores as many. Bases are fitted on the shipped
profile's calibration data (every window) and written as a profile directory, to be scored with
``minicache-eval`` beside the paper preset and the aligned paper layout.

    .venv/bin/python benchmarks/lowrank_paper_layout.py --out /tmp/paper-lowrank
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
from minicache.profile import MergeGroup, MergeProfile, ModelFingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="profiles/smollm2-135m-instruct/calibration-data.jsonl")
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--heads", default="joint", choices=["joint", "each"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    spec = ModelSpec.from_config(model)
    paper = MergeProfile.preset("paper", spec)
    windows = token_windows(read_calibration_data(args.data), tokenizer, args.max_length,
                            max_windows=args.num_samples, spread=True)
    stat = SecondMoments(spec.num_layers, spec.kv_heads, spec.head_dim, max_offset=1)
    for _, _, kv in prefill_batches(model, windows, desc="second moments"):
        stat.add(kv, paper.defaults.sink_tokens)
    method = get_method("lowrank")
    rank = spec.head_dim + 2
    groups, tensors = [], {}
    for g in paper.groups:
        settings = paper.defaults.settings("lowrank", rank=rank, heads=args.heads)
        fitted = method.fit(stat, g.layers)
        for component in ("keys", "values"):
            for local, t in method.tensors_for(settings.params, fitted[component]).items():
                tensors[tensor_name(local, g.label, component)] = t
        groups.append(MergeGroup(g.layers, settings, settings))
    profile = MergeProfile(groups=tuple(groups), defaults=paper.defaults, model=ModelFingerprint.from_spec(spec),
                           tensors=tensors)
    path = profile.save(args.out)
    print(f"paper layout, lowrank rank {rank} ({args.heads}), {len(groups)} pairs: {path}")


if __name__ == "__main__":
    main()
