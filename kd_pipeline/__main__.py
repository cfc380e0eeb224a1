"""``python -m kd_pipeline ...`` (also what torchrun runs: ``torchrun ... -m kd_pipeline label ...``)."""

from kd_pipeline.pipeline.cli import main

main()
