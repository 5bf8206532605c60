"""`dkp-pipeline report`: self-contained HTML pages of an experiment (:mod:`.experiment`) and of a sweep
(:mod:`.sweep`), read from the store; :mod:`.html` and :mod:`.plots` are their building blocks."""
