"""Names of the long-context tasks (:mod:`minicache.evaluate.tasks`), importable without torch."""

#: Every task that can be generated.
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words", "qa_quote")
#: The default suite: the tasks SmolLM2-135M-Instruct answers with the full cache (>= 70 % at 512
#: tokens). ``common_words`` is left out: it scored 44 % at 256 tokens and 50 % at 512 (16 and 10
#: prompts), about what picking a word of the list at random gives, so it cannot separate methods.
DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "qa_quote")
