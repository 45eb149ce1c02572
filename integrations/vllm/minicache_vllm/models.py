"""Model classes that find a minicache profile next to the weights."""

from __future__ import annotations

import os
from pathlib import Path

from vllm.model_executor.models.llama import LlamaForCausalLM

PROFILE_FILENAME = "minicache_config.yaml"  # minicache.profile.PROFILE_FILENAME, without importing torch code


class ProfileNotServableError(RuntimeError):
    """A model directory's profile asks for something this plugin cannot serve (yet)."""


def profile_path(model: str | os.PathLike) -> Path | None:
    """The profile in a local model directory, or None (hub ids and directories without one)."""
    path = Path(model) / PROFILE_FILENAME
    return path if path.is_file() else None


def check_profile(path: Path, hf_config) -> None:
    """Validate the profile against the model, then refuse it: merged storage is not served yet.

    Raises
    ------
    ProfileNotServableError
        Always: naming the profile, what it merges, and what to do instead.
    """
    from minicache.profile import MergeProfile

    profile = MergeProfile.load(path.parent)
    profile.check_model(hf_config)  # a profile made for another model fails here, with its own message
    groups = ", ".join(g.label for g in profile.groups) or "no groups"
    raise ProfileNotServableError(
        f"minicache_vllm: {path} merges layers {groups}, and this plugin cannot serve merged KV storage yet "
        "(issue 19; plan in docs/vllm-plugin-design.md). Serving the full cache instead would not save "
        "the memory the profile promises, so the engine stops here. Use the transformers runtime "
        "(minicache.MiniCache), or serve a directory without minicache_config.yaml."
    )


class MiniCacheLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama; a directory with a minicache profile is refused until merged storage is served."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        path = profile_path(vllm_config.model_config.model)
        if path is not None:
            check_profile(path, vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
