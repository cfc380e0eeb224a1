"""``python -m pipeline`` (also what torchrun runs: ``torchrun ... -m pipeline label ...``)."""

from pipeline.cli import main

main()
