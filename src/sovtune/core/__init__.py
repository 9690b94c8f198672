"""The bottom layer: atomic file writes, hashing, secret redaction, process runtime and the run-directory contract.

Standard library (and PyYAML) only; nothing here knows about recipes, models or data.
"""
