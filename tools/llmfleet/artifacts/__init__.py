"""Artifacts behind the pins: hash-locked wheelhouses for runtimes, locally built models.

Nothing here imports torch: models are written with numpy and tokenizers alone.
"""
