"""llama-tune: recipe-driven fine-tuning and distillation of Llama models."""

__version__ = "0.1.0"
