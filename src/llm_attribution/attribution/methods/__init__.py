"""One attribution method per module, each registered by name with
:func:`~llm_attribution.attribution.registry.register` and found by discovery (no list to keep)."""
