"""Names of the long-context tasks (:mod:`minicache.evaluate.tasks`), importable without torch."""

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words", "qa_quote")
