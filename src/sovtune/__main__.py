"""`python -m sovtune` (also what `accelerate launch -m sovtune train ...` runs)."""

from sovtune.cli import main

main()
