"""A hub of the project's own for tests: the Hugging Face Hub's HTTP API as ``huggingface_hub`` uses it."""

from .server import TestHub

__all__ = ["TestHub"]
