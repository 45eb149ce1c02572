"""Helpers of the evaluation tests: a character tokenizer that fits the tiny models' vocabulary."""

from __future__ import annotations

import types


class CharTokenizer:
    """One token per printable ASCII character (ids 3..97), BOS 1, EOS 2: fits a 128-token vocabulary."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, chat_template: bool = False):
        self.chat_template = "fake" if chat_template else None

    def __len__(self) -> int:
        return 128

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = False):
        ids = [ord(c) - 29 if 32 <= ord(c) < 127 else 3 for c in text]
        return types.SimpleNamespace(input_ids=([self.bos_token_id] if add_special_tokens else []) + ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 29) for i in ids if 3 <= i < 98)
