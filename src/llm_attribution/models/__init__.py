"""Models: resolution of ``--model``, LoRA adapters and fine-tuning."""
