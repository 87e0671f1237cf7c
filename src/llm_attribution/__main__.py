"""``python -m llm_attribution`` = ``llm-attr`` (so ``torchrun -m llm_attribution`` works too)."""

from .cli import main

raise SystemExit(main())
