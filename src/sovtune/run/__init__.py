"""Run-directory services: the writer lock, checkpoints and disk checks, signals, the resume fingerprint, the
manifest and its verification."""
