"""The ``pipeline`` command line: a thin click adapter over ``stages`` and ``data``."""
