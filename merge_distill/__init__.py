"""merge_distill: per-token multi-teacher distillation of language models."""

__version__ = "0.1.0"
