"""PCA against query-weighted key bases at the same groups and ranks (issue 17, item 2).

Takes a profile with low-rank groups (e.g. a search's result), captures the second moments of the
keys, values and post-RoPE queries on calibration windows, and writes two profiles with the same
groups, ranks and value bases, whose low-rank *key* bases are refitted on those windows:

* ``<out>-pca``: plain PCA (least restore error of the keys);
* ``<out>-query``: weighted by the queries' second moment (least error in the logits ``q·k``),
  an encoder beside each basis (:mod:`minicache.methods.moments`).

Both refit on the same windows, so ``minicache-eval --compare <out>-pca,<out>-query`` isolates what
the key basis buys at equal bytes.

    .venv/bin/python benchmarks/lowrank_query_basis.py --profile benchmarks/results/lowrank-cpu/profile \\
        --out /tmp/search
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from minicache.calibrate.api import read_calibration_data
from minicache.calibrate.capture import prefill_batches
from minicache.data import token_windows
from minicache.methods.base import tensor_name
from minicache.methods.moments import SecondMoments, fit_bases
from minicache.model_spec import ModelSpec
from minicache.models import load_model
from minicache.profile import MergeGroup, MergeProfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="a profile directory with low-rank groups")
    parser.add_argument("--data", default="profiles/smollm2-135m-instruct/calibration-data.jsonl")
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--out", required=True, help="prefix of the two profile directories written")
    args = parser.parse_args()

    source = MergeProfile.load(args.profile)
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    spec = ModelSpec.from_config(model)
    source.check_model(model.config)
    sinks = source.defaults.sink_tokens
    windows = token_windows(read_calibration_data(args.data), tokenizer, args.max_length,
                            max_windows=args.num_samples, spread=True)
    span = max(g.layers[-1] - g.layers[0] for g in source.groups)
    stat = SecondMoments(spec.num_layers, spec.kv_heads, spec.head_dim, max_offset=span)
    for _, _, kv in prefill_batches(model, windows, desc="second moments and queries",
                                    on_queries=lambda layer, q: stat.add_queries(layer, q, sinks)):
        stat.add(kv, sinks)

    for basis in ("pca", "query"):
        groups, tensors = [], {}
        for group in source.groups:
            fitted = fit_bases(stat, group.layers)
            settings = {}
            for component, s in group.components():
                if s.method == "lowrank":
                    if component == "keys":
                        s = replace(s, params=replace(s.params, basis=basis))
                    own = s.merge_method.tensors_for(s.params, fitted[component])
                else:
                    own = source.tensors_of(group, component)
                for local, t in own.items():
                    tensors[tensor_name(local, group.label, component)] = t
                settings[component] = s
            groups.append(MergeGroup(group.layers, settings["keys"], settings["values"]))
        profile = MergeProfile(groups=tuple(groups), defaults=source.defaults, model=source.model,
                               tensors=tensors or None, quantization=source.quantization)
        path = profile.save(f"{args.out}-{basis}")
        print(f"{basis} key bases: {path}")


if __name__ == "__main__":
    main()
