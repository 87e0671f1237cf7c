"""A test hook that stops the process at a named point, so a test can kill it there (TEST USE ONLY).

``LLM_ATTR_PAUSE_AT=NAME:COUNT`` makes the COUNT-th call of :func:`pause_point` with ``NAME`` in this
process print ``llm-attr: paused at NAME:COUNT`` to stderr and then sleep until the process is killed.
``scripts/kill_resume.py`` uses it to SIGKILL ``llm-attr run`` at exact moments: mid fine-tuning step, mid
feature shard, mid scoring. Points are placed where work is half done (computed, not yet stored), the
worst moment for a crash. Unset (always, outside tests), a pause point costs one dictionary lookup.

Points: ``finetune-step`` (after an optimizer step, before its checkpoint), ``features-shard`` (a shard's
features computed, not yet written), ``scores-block`` (a gradient method's sum over one more LoRA block
computed, not yet kept), ``scores-method`` (a method's scores computed, not yet written),
``retrain-result`` (a ground-truth retrain measured, its file not yet written).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

ENV = "LLM_ATTR_PAUSE_AT"
POINTS = ("finetune-step", "features-shard", "scores-block", "scores-method", "retrain-result")
_calls: Counter[str] = Counter()


def pause_point(name: str) -> None:
    """Sleep forever here if ``LLM_ATTR_PAUSE_AT`` names this point and call count (test use only)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    _calls[name] += 1
    point, _, count = wanted.partition(":")
    if point == name and _calls[name] == int(count or 1):
        sys.stderr.write(f"llm-attr: paused at {name}:{_calls[name]}\n")
        sys.stderr.flush()
        while True:  # until SIGKILL
            time.sleep(60)
