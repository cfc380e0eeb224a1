"""``python -m kd_pipeline.pipeline ...``: the same as ``python -m kd_pipeline ...``."""

from .cli import main

main()
