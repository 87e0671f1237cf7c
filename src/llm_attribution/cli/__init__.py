"""``llm-attr``, the command line: the verb table (:mod:`.main`), options derived from the settings
dataclasses (:mod:`.options`) and one handler per verb (:mod:`.commands`)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
