"""The study's section-4 analyses: why influence functions fail on LLMs, made measurable."""
