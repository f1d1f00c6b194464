"""Shared plumbing every stage uses: typed errors, config dataclasses and their option checks,
crash-safe output folders and files, NaN checks, image metrics, progress display and torchrun helpers.

Imports nothing else from dgo_compile, so every other sub-package may import it.
"""
