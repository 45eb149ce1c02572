"""Merge profiles: YAML round trips, atomic saves, presets, validation messages, model checks."""

from __future__ import annotations

import copy
import importlib
import os
import pickle
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

try:
    from tests.tiny_configs import ARCHS, MIXED_ARCHS, tiny_config
except ModuleNotFoundError:  # plain `pytest` puts tests/ (not the repo root) on sys.path
    from tiny_configs import ARCHS, MIXED_ARCHS, tiny_config

# Imported through importlib so these tests run even while minicache/__init__.py (which imports
# the runtime) is mid-edit.
profile_mod = importlib.import_module("minicache.profile")
Defaults = profile_mod.Defaults
MergeGroup = profile_mod.MergeGroup
MergeProfile = profile_mod.MergeProfile
MergeSettings = profile_mod.MergeSettings
ModelFingerprint = profile_mod.ModelFingerprint
ModelMismatchWarning = profile_mod.ModelMismatchWarning
ProfileError = profile_mod.ProfileError
PROFILE_FILENAME = profile_mod.PROFILE_FILENAME
ModelSpec = importlib.import_module("minicache.model_spec").ModelSpec


@pytest.fixture(scope="module")
def llama30():
    config = tiny_config("llama", num_hidden_layers=30)
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return config


def calibrated_profile(config) -> MergeProfile:
    """A profile with per-group settings and calibration data, as the calibrator writes one."""
    defaults = Defaults(gamma=0.1, residual_length=64, block_size=32)
    groups = (
        MergeGroup(
            (20, 21),
            MergeSettings.create(t=0.6, gamma=0.05),
            MergeSettings.create(t=0.4, gamma=0.2, retention="similar"),
        ),
        MergeGroup((24, 25), defaults.settings(t=0.5), MergeSettings.create(sink_tokens=4)),
    )
    calibration = {
        "data": {"path": "sample.jsonl", "sha256": "ab" * 32, "samples": 64, "tokens": 32768, "seed": 0},
        "budget": {"metric": "ppl_increase", "max": 0.01},
        "measured": {"ppl_increase": 0.0093, "per_group": [0.004, 0.0053], "top1_agreement": 0.97},
        "method": "search",
    }
    return MergeProfile(
        groups=groups,
        defaults=defaults,
        model=ModelFingerprint.from_config(config),
        calibration=calibration,
    )


def base_dict() -> dict:
    """A valid profile as parsed YAML, for the validation tests to break one field at a time."""
    return {
        "format_version": 2,
        "producer": {"name": "minicache", "version": "0.1.0"},
        "defaults": {
            "gamma": 0.05,
            "retention": "distinct",
            "sink_tokens": 1,
            "residual_length": 128,
        },
        "groups": [
            {
                "layers": [20, 21],
                "keys": {"method": "slerp", "t": 0.6, "gamma": 0.05},
                "values": {"method": "slerp", "t": 0.6, "gamma": 0.05},
            },
            {"layers": [22, 23]},
        ],
    }


# ---- round trips and files --------------------------------------------------------------------
def test_round_trip_is_equal_and_byte_identical(tmp_path, llama30):
    profile = calibrated_profile(llama30)
    written = profile.save(tmp_path / "a")
    assert written == tmp_path / "a" / PROFILE_FILENAME
    loaded = MergeProfile.load(written)
    assert loaded == profile
    assert written.read_text(encoding="utf-8") == profile.to_yaml() == loaded.to_yaml()
    again = loaded.save(tmp_path / "b.yaml")
    assert again.read_bytes() == written.read_bytes()
    assert MergeProfile.from_dict(profile.to_dict()) == profile


def test_yaml_layout_follows_the_design(llama30):
    text = calibrated_profile(llama30).to_yaml()
    data = yaml.safe_load(text)
    assert list(data) == ["format_version", "producer", "model", "defaults", "groups", "calibration"]
    assert "producer: {name: minicache, version: " in text
    assert (
        "  - layers: [20, 21]\n    keys: {method: slerp, t: 0.6, gamma: 0.05, retention: distinct, sink_tokens: 1}\n"
        in text
    )
    assert list(data["model"]) == [
        "name_or_path",
        "model_type",
        "num_hidden_layers",
        "num_key_value_heads",
        "head_dim",
        "config_sha256",
    ]
    # A preset has no calibration block and no model-independent noise such as timestamps.
    preset = MergeProfile.preset("paper", llama30).to_yaml()
    assert "calibration" not in preset
    assert preset == MergeProfile.preset("paper", llama30).to_yaml()


def test_equal_calibration_dicts_give_identical_yaml(llama30):
    one = calibrated_profile(llama30)
    reordered = dict(reversed(list(one.calibration.items())))
    two = MergeProfile(one.groups, one.defaults, one.model, reordered)
    assert one == two
    assert one.to_yaml() == two.to_yaml()


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, llama30, monkeypatch):
    profile = MergeProfile.preset("paper", llama30)
    path = profile.save(tmp_path)
    assert os.listdir(tmp_path) == [PROFILE_FILENAME], "no temp file left behind"
    before = path.read_bytes()

    other = MergeProfile.preset("paper", llama30, start=20)
    with pytest.raises(FileExistsError, match="overwrite"):
        other.save(tmp_path)
    with pytest.raises(FileExistsError, match="--force"):
        other.save(path)
    assert path.read_bytes() == before

    # A write that fails half-way leaves the old file intact and no temp file.
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(profile_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        other.save(tmp_path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [PROFILE_FILENAME]

    assert other.save(tmp_path, overwrite=True) == path
    assert MergeProfile.load(tmp_path) == other
    assert os.listdir(tmp_path) == [PROFILE_FILENAME]
    assert path.stat().st_mode & 0o044, "a shipped profile is readable by others"


def test_load_from_model_directory_and_file(tmp_path, llama30):
    profile = MergeProfile.preset("paper", llama30)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    profile.save(model_dir)
    assert MergeProfile.load(model_dir) == profile
    assert MergeProfile.load(str(model_dir / PROFILE_FILENAME)) == profile
    yml = profile.save(tmp_path / "nested" / "mine.yml")
    assert yml.name == "mine.yml"
    assert MergeProfile.load(yml) == profile


def test_missing_profile_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MiniCache profile"):
        MergeProfile.load(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match=PROFILE_FILENAME):
        MergeProfile.load(tmp_path)


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("format_version: 1\ngroups:\n  - layers: [3, 4]\n    keys: {t: 1.5}\n")
    with pytest.raises(ProfileError) as err:
        MergeProfile.load(bad)
    assert str(err.value) == f"{bad}: groups[0].keys.t: 1.5 is out of range; allowed: a number in [0, 1]"
    assert err.value.path == "groups[0].keys.t"

    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ProfileError, match="empty"):
        MergeProfile.load(tmp_path / "empty.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("format_version: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        MergeProfile.load(evil)


# ---- presets ----------------------------------------------------------------------------------
def test_paper_preset_on_30_layers(llama30):
    profile = MergeProfile.preset("paper", llama30)
    assert [g.layers for g in profile.groups] == [(s, s + 1) for s in range(15, 29, 2)]
    assert profile.groups[-1].layers == (27, 28)
    assert all(g.keys == g.values == MergeSettings.create(t=0.6, gamma=0.05) for g in profile.groups)
    assert profile.groups[0].keys.method == "slerp" and profile.groups[0].keys.params.t == 0.6
    assert profile.model == ModelFingerprint.from_config(llama30)
    assert profile.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert profile.calibration is None
    assert profile.describe().startswith("paper preset: 7 groups [15-16, 17-18, 19-20,")
    assert "paper preset: 7 groups" in repr(profile)
    profile.check_model(llama30)


def test_paper_preset_overrides(llama30):
    profile = MergeProfile.preset(
        "paper", llama30, t=0.5, gamma=0.1, start=24, residual_length=0, block_size=16
    )
    assert [g.layers for g in profile.groups] == [(24, 25), (26, 27), (28, 29)]
    assert profile.groups[0].keys == MergeSettings.create(t=0.5, gamma=0.1)
    assert profile.defaults == Defaults(gamma=0.1, residual_length=0, block_size=16)
    # Odd layer counts: the last layer stays unpaired.
    odd = MergeProfile.preset("paper", tiny_config("llama", num_hidden_layers=5))
    assert [g.layers for g in odd.groups] == [(2, 3)]


def test_preset_errors(llama30):
    with pytest.raises(
        ProfileError, match=r"preset: 'minicache' is not a known preset; allowed: one of 'paper', 'none'"
    ):
        MergeProfile.preset("minicache", llama30)
    with pytest.raises(ProfileError, match=r"start: 29 leaves no pair of layers; allowed: 0\.\.28"):
        MergeProfile.preset("paper", llama30, start=29)
    with pytest.raises(ProfileError, match=r"^t: 2\.0 is out of range"):
        MergeProfile.preset("paper", llama30, t=2.0)
    with pytest.raises(ProfileError, match=r"defaults\.residual_lenght: unknown setting"):
        MergeProfile.preset("paper", llama30, residual_lenght=8)


def test_none_preset_is_the_full_cache(llama30):
    profile = MergeProfile.preset("none", llama30)
    assert profile.groups == ()
    assert profile.merged_layers == set()
    assert profile.model is not None
    assert "no groups" in profile.describe()


def test_paper_preset_refuses_alternating_sliding_layers():
    # Gemma 2 alternates sliding/full layers, so every adjacent pair mixes attention types.
    with pytest.raises(ProfileError, match=r"'paper' preset does not fit.*differ in attention type"):
        MergeProfile.preset("paper", tiny_config("gemma2"))


# ---- validation messages ----------------------------------------------------------------------
def _set(path: tuple, value):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()

VALIDATION_CASES = {
    "unknown top-level key": (
        _set(("group",), []),
        "group: unknown key 'group' (did you mean 'groups'?); allowed keys at the top level: "
        "format_version, producer, model, defaults, groups, calibration",
    ),
    "unknown settings key": (
        _set(("groups", 0, "keys", "gama"), 0.1),
        "groups[0].keys.gama: unknown key 'gama' (did you mean 'gamma'?); allowed keys at groups[0].keys: "
        "method, t, weights, align, gamma, retention, sink_tokens",
    ),
    "unknown group key": (
        _set(("groups", 1, "t"), 0.5),
        "groups[1].t: unknown key 't'; allowed keys at groups[1]: layers, keys, values",
    ),
    "t out of range": (
        _set(("groups", 0, "keys", "t"), 1.5),
        "groups[0].keys.t: 1.5 is out of range; allowed: a number in [0, 1]",
    ),
    "t not a number": (
        _set(("groups", 0, "values", "t"), "high"),
        "groups[0].values.t: 'high' is a str; allowed: a number in [0, 1]",
    ),
    "gamma out of range": (
        _set(("defaults", "gamma"), -0.1),
        "defaults.gamma: -0.1 is out of range; allowed: a number in [0, 1]",
    ),
    "gamma NaN": (
        _set(("groups", 0, "keys", "gamma"), float("nan")),
        "groups[0].keys.gamma: nan is out of range; allowed: a number in [0, 1]",
    ),
    "bad retention": (
        _set(("groups", 0, "values", "retention"), "closest"),
        "groups[0].values.retention: 'closest' is not a retention rule; "
        "allowed: one of 'distinct', 'similar'",
    ),
    "negative sink_tokens": (
        _set(("defaults", "sink_tokens"), -1),
        "defaults.sink_tokens: -1 is out of range; allowed: an integer >= 0",
    ),
    "bool sink_tokens": (
        _set(("groups", 0, "keys", "sink_tokens"), True),
        "groups[0].keys.sink_tokens: True is a bool; allowed: an integer >= 0",
    ),
    "negative residual_length": (
        _set(("defaults", "residual_length"), -8),
        "defaults.residual_length: -8 is out of range; allowed: an integer >= 0",
    ),
    "zero block_size": (
        _set(("defaults", "block_size"), 0),
        "defaults.block_size: 0 is out of range; allowed: an integer >= 1",
    ),
    "float block_size": (
        _set(("defaults", "block_size"), 32.0),
        "defaults.block_size: 32.0 is a float; allowed: an integer >= 1",
    ),
    "overlapping groups": (
        _set(("groups", 1, "layers"), [21, 22]),
        "groups[1].layers: [21, 22] overlaps groups[0] ([20, 21]) at layer 21; "
        "allowed: each layer in at most one group",
    ),
    "non-adjacent layers": (
        _set(("groups", 1, "layers"), [22, 24]),
        "groups[1].layers: [22, 24] is non-adjacent (24 does not directly follow 22); "
        "allowed: a list of strictly consecutive layer indices, e.g. [20, 21] (at least 2 for merges;",
    ),
    "descending layers": (
        _set(("groups", 1, "layers"), [23, 22]),
        "groups[1].layers: [23, 22] is non-adjacent",
    ),
    "single layer": (
        _set(("groups", 1, "layers"), [22]),
        "groups[1].layers: [22] has fewer than 2 layers, the fewest method 'slerp' stores; allowed: a list of "
        "strictly consecutive",
    ),
    "negative layer": (
        _set(("groups", 1, "layers"), [-1, 0]),
        "groups[1].layers[0]: -1 is negative; allowed: a layer index (integer >= 0)",
    ),
    "layer not an int": (
        _set(("groups", 1, "layers"), [22, "23"]),
        "groups[1].layers[1]: '23' is a str; allowed: a layer index (integer >= 0)",
    ),
    "layers not a list": (
        _set(("groups", 1, "layers"), "22-23"),
        "groups[1].layers: '22-23' is a str; allowed: a list of strictly consecutive",
    ),
    "missing layers": (
        _set(("groups", 1, "layers"), _DELETE),
        "groups[1]: required key 'layers' is missing; allowed keys at groups[1]: layers, keys, values",
    ),
    "groups not a list": (
        _set(("groups",), {"layers": [1, 2]}),
        "groups: {'layers': [1, 2]} is a dict; allowed: a list of groups",
    ),
    "settings not a mapping": (
        _set(("groups", 0, "keys"), 0.6),
        "groups[0].keys: 0.6 is a float; allowed: a mapping with keys method, gamma, retention, sink_tokens",
    ),
    "unsupported format_version": (
        _set(("format_version",), 3),
        "format_version: 3 is not supported (written by a newer minicache: upgrade minicache to read it); "
        "allowed: one of [1, 2]",
    ),
    "format_version as text": (
        _set(("format_version",), "2"),
        "format_version: '2' is a str; allowed: one of [1, 2]",
    ),
    "unknown method": (
        _set(("groups", 0, "keys", "method"), "slrep"),
        "groups[0].keys.method: 'slrep' is not a registered merge method (did you mean 'slerp'?); allowed: one of",
    ),
    "a method's own parameter validated by the method": (
        _set(("groups", 0, "values", "align"), "yes"),
        "groups[0].values.align: 'yes' is a str; allowed: true or false",
    ),
    "another method's parameter": (
        _set(("groups", 0, "keys"), {"method": "average", "rank": 4}),
        "groups[0].keys.rank: unknown key 'rank'; allowed keys at groups[0].keys: method, t, weights, align, gamma",
    ),
    "t in format 2 defaults": (
        _set(("defaults", "t"), 0.5),
        "defaults.t: unknown key 't'; allowed keys at defaults: gamma, retention, sink_tokens",
    ),
    "missing format_version": (
        _set(("format_version",), _DELETE),
        "required key 'format_version' is missing; allowed keys at the top level: format_version, producer",
    ),
    "producer without version": (
        _set(("producer",), {"name": "minicache"}),
        "producer: required key 'version' is missing; allowed keys at producer: name, version",
    ),
    "model fingerprint incomplete": (
        _set(("model",), {"model_type": "llama", "num_hidden_layers": 30}),
        "model: required key 'num_key_value_heads' is missing",
    ),
    "bad config_sha256": (
        _set(
            ("model",),
            {
                "model_type": "llama",
                "num_hidden_layers": 30,
                "num_key_value_heads": 3,
                "head_dim": 64,
                "config_sha256": "abc",
            },
        ),
        "model.config_sha256: 'abc' is not a SHA-256; allowed: 64 lowercase hex digits",
    ),
    "calibration not a mapping": (
        _set(("calibration",), [1, 2]),
        "calibration: [1, 2] is a list; allowed: a mapping or null",
    ),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_validation_error_messages(case):
    mutate, expected = VALIDATION_CASES[case]
    data = base_dict()
    mutate(data)
    with pytest.raises(ProfileError) as err:
        MergeProfile.from_dict(data)
    assert str(err.value).startswith(expected), f"{case}: {err.value}"
    assert isinstance(err.value, ValueError)


def test_valid_base_dict_loads():
    profile = MergeProfile.from_dict(base_dict())
    assert [g.layers for g in profile.groups] == [(20, 21), (22, 23)]
    assert profile.model is None and profile.calibration is None


def test_constructors_validate_too():
    with pytest.raises(ProfileError, match=r"^t: 1\.5 is out of range; allowed: a number in \[0, 1\]$"):
        MergeSettings.create(t=1.5)
    with pytest.raises(ProfileError, match=r"^block_size: 0 is out of range"):
        Defaults(block_size=0)
    s = MergeSettings.create()
    with pytest.raises(ProfileError, match=r"^layers: \[3, 5\] is non-adjacent"):
        MergeGroup((3, 5), s, s)
    with pytest.raises(ProfileError, match=r"^keys: .* is a dict; allowed: a MergeSettings"):
        MergeGroup((3, 4), {"t": 0.5}, s)
    with pytest.raises(ProfileError, match=r"^method: 'mean' is not a registered merge method"):
        MergeSettings(method="mean")
    with pytest.raises(ProfileError, match=r"^groups\[1\]\.layers: \[4, 5\] overlaps groups\[0\]"):
        MergeProfile(groups=(MergeGroup((3, 4), s, s), MergeGroup((4, 5), s, s)))
    with pytest.raises(ProfileError, match=r"^calibration\.data\.path: .* is a object; allowed: plain data"):
        MergeProfile(calibration={"data": {"path": object()}})
    # Normalised: ints for floats, lists for tuples, tuples for layer lists.
    group = MergeGroup([3, 4], MergeSettings.create(t=1, gamma=0), s)
    assert group.layers == (3, 4) and group.keys.params.t == 1.0 and isinstance(group.keys.params.t, float)
    assert MergeProfile(calibration={"x": (1, 2)}).calibration == {"x": [1, 2]}


def test_partial_group_settings_inherit_defaults():
    data = {
        "format_version": 2,
        "defaults": {"gamma": 0.2, "sink_tokens": 4, "block_size": 16},
        "groups": [
            {"layers": [10, 11], "keys": {"gamma": 0.3, "t": 0.5}},
            {"layers": [12, 13], "values": None},
        ],
    }
    profile = MergeProfile.from_dict(data)
    inherited = MergeSettings.create(t=0.6, gamma=0.2, retention="distinct", sink_tokens=4)
    assert profile.groups[0].keys == MergeSettings.create(t=0.5, gamma=0.3, sink_tokens=4)
    assert profile.groups[0].values == inherited  # method and its parameters at their defaults
    assert profile.groups[1].keys == profile.groups[1].values == inherited
    assert profile.defaults.residual_length == 128  # built-in default for what the file omits
    resolved = profile.to_dict()["groups"][0]
    assert resolved["keys"] == {"method": "slerp", "t": 0.5, "gamma": 0.3, "retention": "distinct", "sink_tokens": 4}
    assert resolved["values"] == {"method": "slerp", "t": 0.6, "gamma": 0.2, "retention": "distinct", "sink_tokens": 4}


def test_format_1_profiles_load_as_format_2():
    data = {
        "format_version": 1,
        "defaults": {"t": 0.5, "gamma": 0.2, "sink_tokens": 4, "block_size": 16},
        "groups": [
            {"layers": [10, 11], "keys": {"gamma": 0.3}, "values": {"t": 0.4, "method": "average"}},
            {"layers": [12, 13, 14], "values": {"weights": [0.2, 0.3, 0.5]}},
        ],
    }
    profile = MergeProfile.from_dict(data)
    assert profile.format_version == 2
    assert profile.groups[0].keys == MergeSettings.create(t=0.5, gamma=0.3, sink_tokens=4)  # defaults.t inherited
    assert profile.groups[0].values == MergeSettings.create("average", t=0.4, gamma=0.2, sink_tokens=4)
    assert profile.groups[1].values.params.weights == (0.2, 0.3, 0.5)
    assert yaml.safe_load(profile.to_yaml())["format_version"] == 2
    with pytest.raises(ProfileError, match=r"^groups\[0\]\.keys\.rank: unknown key 'rank'"):
        MergeProfile.from_dict({"format_version": 1, "groups": [{"layers": [1, 2], "keys": {"rank": 2}}]})


def test_from_dict_does_not_mutate_its_input():
    data = base_dict()
    snapshot = copy.deepcopy(data)
    MergeProfile.from_dict(data)
    assert data == snapshot


def test_profile_error_pickles():
    err = ProfileError("1.5 is out of range; allowed: a number in [0, 1]", "groups[2].keys.t")
    assert str(err) == "groups[2].keys.t: 1.5 is out of range; allowed: a number in [0, 1]"
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


# ---- queries ----------------------------------------------------------------------------------
def test_group_of_and_merged_layers():
    s = MergeSettings.create()
    profile = MergeProfile(groups=(MergeGroup((2, 3), s, s), MergeGroup((5, 6, 7), s, s)))
    assert profile.merged_layers == {2, 3, 5, 6, 7}
    assert profile.group_of(3) == (profile.groups[0], 1)
    assert profile.group_of(7) == (profile.groups[1], 2)
    assert profile.group_of(4) is None


# ---- model checks -----------------------------------------------------------------------------
def test_layers_out_of_range(llama30):
    s = MergeSettings.create()
    profile = MergeProfile(groups=(MergeGroup((20, 21), s, s), MergeGroup((31, 32), s, s)))
    with pytest.raises(ProfileError) as err:
        profile.check_model(llama30)
    assert (
        str(err.value)
        == "groups[1].layers: layer 31 out of range; allowed: 0..29 for this model (num_hidden_layers=30)"
    )
    # Even with allow_mismatch: a missing layer cannot be merged.
    with pytest.raises(ProfileError, match="out of range"):
        profile.check_model(llama30, allow_mismatch=True)


@pytest.mark.parametrize(
    ("arch", "groups"),
    [
        ("gemma2", ((0, 1),)),  # Gemma 2: sliding, full, sliding, full
        ("gemma3", ((2, 3), (4, 5))),  # Gemma 3: five local layers, then a global one
    ],
)
def test_groups_mixing_attention_types_are_refused(arch, groups):
    config = tiny_config(arch)
    s = MergeSettings.create()
    profile = MergeProfile(groups=tuple(MergeGroup(g, s, s) for g in groups))
    if len(groups) > 1:
        MergeProfile(groups=profile.groups[:-1]).check_model(config)  # local layers only: fine
    # allow_mismatch only concerns the fingerprint: this error always raises.
    with pytest.raises(ProfileError) as err:
        profile.check_model(config, allow_mismatch=True)
    i, (a, b) = len(groups) - 1, groups[-1]
    assert str(err.value) == (
        f"groups[{i}].layers: [{a}, {b}]: layers {a} and {b} differ in attention type "
        "('sliding_attention' vs 'full_attention'); "
        "allowed: layers with the same attention type in one group "
        "(a merged cache is attended the same way by every layer of its group)"
    )


def test_groups_mixing_rotary_settings_are_refused():
    # SmolLM3 style: every second layer has no RoPE; both are full-attention layers.
    config = tiny_config("smollm3")
    assert ModelSpec.from_config(config).attention_types == ["full_attention"] * 4
    s = MergeSettings.create()
    with pytest.raises(
        ProfileError, match=r"groups\[0\]\.layers: \[0, 1\]: layers 0 and 1 differ in rotary settings"
    ):
        MergeProfile(groups=(MergeGroup((0, 1), s, s),)).check_model(config)


def test_groups_mixing_kv_shapes_are_refused():
    # transformers' heterogeneous configs: layer 3 has one KV head, the others two.
    config = tiny_config("llama", per_layer_config={3: {"num_key_value_heads": 1}})
    assert ModelSpec.from_config(config).fingerprint_fields["num_key_value_heads"] == [2, 2, 2, 1]
    s = MergeSettings.create()
    MergeProfile(groups=(MergeGroup((0, 1), s, s),)).check_model(config)
    with pytest.raises(
        ProfileError, match=r"layers 2 and 3 differ in KV shape .* \(\(2, 16\) vs \(1, 16\)\)"
    ):
        MergeProfile(groups=(MergeGroup((2, 3), s, s),)).check_model(config)


def test_gemma3_rope_signatures_differ_between_local_and_global_layers():
    config = tiny_config("gemma3")
    spec = ModelSpec.from_config(config)
    types, ropes = spec.attention_types, spec.rope_signatures
    assert types == ["sliding_attention"] * 5 + ["full_attention"]
    assert dict(ropes[0])["rope_theta"] == 10_000
    assert dict(ropes[5])["rope_theta"] == 1_000_000
    assert len(set(ropes[:5])) == 1 and ropes[4] != ropes[5]


def test_mistral_sliding_window_makes_sliding_layers():
    assert set(ModelSpec.from_config(tiny_config("mistral")).attention_types) == {"sliding_attention"}
    full = tiny_config("mistral", sliding_window=None)
    assert set(ModelSpec.from_config(full).attention_types) == {"full_attention"}
    # Uniform layers: a pair is valid for the profile (the runtime decides what it supports).
    MergeProfile.preset("paper", tiny_config("mistral"))


def test_layer_types_without_the_transformers_helper(monkeypatch):
    # Older transformers have no get_layer_types_and_kwargs: the inference must agree with it.
    import transformers.cache_utils

    configs = [tiny_config("mistral"), tiny_config("gemma2"), tiny_config("llama")]
    want = [ModelSpec.from_config(c).attention_types for c in configs]
    monkeypatch.delattr(transformers.cache_utils, "get_layer_types_and_kwargs")
    assert [ModelSpec.from_config(c).attention_types for c in configs] == want
    assert want[0] == ["sliding_attention"] * 4 and want[2] == ["full_attention"] * 4


def test_fingerprint_mismatch_raises_or_warns(llama30):
    profile = MergeProfile.preset("paper", llama30)
    other = tiny_config("llama", num_hidden_layers=32)
    with pytest.raises(ProfileError) as err:
        profile.check_model(other)
    text = str(err.value)
    assert text.startswith(
        "model: this profile was made for another model (HuggingFaceTB/SmolLM2-135M-Instruct)"
    )
    assert "num_hidden_layers: profile 30, model 32" in text and "config_sha256" in text
    assert "allow_mismatch=True" in text and "--allow-model-mismatch" in text
    with pytest.warns(ModelMismatchWarning, match="num_hidden_layers: profile 30, model 32"):
        profile.check_model(other, allow_mismatch=True)


def test_fingerprint_mismatch_in_hashed_fields_only(llama30):
    profile = MergeProfile.preset("paper", llama30)
    other = tiny_config(
        "llama", num_hidden_layers=30, rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    )
    with pytest.raises(
        ProfileError, match=r"^model: .*config_sha256: profile '[0-9a-f]{64}', model '[0-9a-f]{64}'"
    ):
        profile.check_model(other)


def test_fingerprint_is_stable_and_ignores_the_name(llama30):
    fp = ModelFingerprint.from_config(llama30)
    assert (fp.model_type, fp.num_hidden_layers, fp.num_key_value_heads, fp.head_dim) == ("llama", 30, 2, 16)
    assert re.fullmatch(r"[0-9a-f]{64}", fp.config_sha256)
    renamed = ModelFingerprint.from_config(llama30, name_or_path="/models/somewhere-else")
    assert renamed.name_or_path == "/models/somewhere-else" and renamed.matches(fp)
    # 10000 in a config.json and the default 10000.0 are the same model.
    as_int = tiny_config(
        "llama", num_hidden_layers=30, rope_parameters={"rope_type": "default", "rope_theta": 10000}
    )
    assert ModelFingerprint.from_config(as_int).config_sha256 == fp.config_sha256
    assert ModelFingerprint.from_config(tiny_config("llama", num_hidden_layers=30, vocab_size=256)).matches(
        fp
    )


def test_fingerprint_defaults_for_absent_fields():
    # Qwen2/Phi-3 configs have no head_dim; num_key_value_heads=None means multi-head attention.
    for arch in ("qwen2", "phi3"):
        config = tiny_config(arch)
        del config.head_dim
        assert ModelFingerprint.from_config(config).head_dim == 16
    mha = tiny_config("llama", num_key_value_heads=None)
    assert ModelFingerprint.from_config(mha).num_key_value_heads == 4


def test_check_model_accepts_a_model():
    config = tiny_config("llama")
    model = AutoModelForCausalLM.from_config(config)
    profile = MergeProfile.preset("paper", config)
    profile.check_model(model)


# ---- tiny configs -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS + MIXED_ARCHS + ("smollm3",))
def test_tiny_configs_build_models(arch):
    config = tiny_config(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        logits = model(torch.randint(3, config.vocab_size, (2, 12))).logits
    assert logits.shape == (2, 12, config.vocab_size)
    fp = ModelFingerprint.from_config(config)
    assert (fp.num_key_value_heads, fp.head_dim) == (2, 16)


def test_atomic_write_makes_a_readable_file_and_refuses_to_clobber(tmp_path):
    from minicache.fileio import atomic_write

    target = tmp_path / "report.md"
    atomic_write(target, b"one", overwrite=False)
    assert target.read_bytes() == b"one"
    assert target.stat().st_mode & 0o777 == 0o644  # shipped next to weights: readable by others
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        atomic_write(target, b"two", overwrite=False)
    atomic_write(target, b"two", overwrite=True)
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left behind


# ---- format 1 ---------------------------------------------------------------------------------
def test_the_shipped_profile_in_format_1_still_loads():
    """The profile this repository shipped in format 1 (fixture: the files as they were) loads, has the
    same groups and settings as the format-2 profile shipped now, and writes back as format 2 with the
    same sidecar bytes.

    The shipped profile has since been recalibrated (same data and seed; on another machine, and with
    held-out windows spread over the data and an interval): its rotations differ by float rounding
    (< 1e-5), so those are compared with a tolerance; its measured figures are those of other held-out
    windows and are not compared."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    old = MergeProfile.load(root / "tests/fixtures/shipped-profile-v1")
    new = MergeProfile.load(root / "profiles/smollm2-135m-instruct")
    assert "format_version: 1" in (root / "tests/fixtures/shipped-profile-v1/minicache_config.yaml").read_text()
    assert old.groups == new.groups and old.model == new.model and old.defaults == new.defaults
    assert old.tensors.names() == new.tensors.names()
    for name in old.tensors.names():
        torch.testing.assert_close(old.tensors[name], new.tensors[name], atol=1e-5, rtol=0)
    assert "ppl_increase_ci95" not in old.calibration["measured"], "format 1 had no interval"
    _, high = new.calibration["measured"]["ppl_increase_ci95"]
    assert high <= new.calibration["budget"]["max"], "the shipped profile fits its budget at the interval's end"
    assert [g.layers for g in old.groups] == [(25, 26), (27, 28, 29)]
    assert all(s.method == "slerp" and s.params.align for g in old.groups for _, s in g.components())
    assert old.groups[0].keys.params.t == 0.5
    assert "format_version: 2" in old.to_yaml()
    assert MergeProfile.from_yaml(old.to_yaml(), tensors=old.tensors) == old
    legacy = root / "tests/fixtures/shipped-profile-v1/minicache_tensors.safetensors"
    assert old.tensors.to_bytes() == legacy.read_bytes()
