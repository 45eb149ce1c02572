"""The decode benchmarks' inputs (benchmarks/vllm_decode.sh, benchmarks/vllm_plugin_time_ab.sh), written into WORK:
``prompts.json``, 10 prompts of 600 unseen-text tokens (WORK's code.txt, notes.txt and licences.txt taken in turn),
and ``profile-shipped-4bit``, the shipped profile with 4-bit KIVI (4 exact sinks, pre-RoPE keys).

    python benchmarks/vllm_decode_inputs.py WORK
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_agreement import token_windows

from minicache import MergeProfile
from minicache.models import load_model
from minicache.profile import Quantization

work = Path(sys.argv[1])
_, tok = load_model("smollm2-135m")
texts = [str(work / n) for n in ("code.txt", "notes.txt", "licences.txt")]
(work / "prompts.json").write_text(json.dumps(token_windows(tok, texts, 10, 600)))
q = Quantization(bits=4, group_size=128, residual_length=128, sink_tokens=4, pre_rope_keys=True)
MergeProfile.load("profiles/smollm2-135m-instruct").with_quantization(q).save(work / "profile-shipped-4bit")
