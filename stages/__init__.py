"""The two stages: ``label`` (teacher -> store) and ``train`` (store -> student), and the distillation losses."""
