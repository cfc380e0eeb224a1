"""kd-pipeline: offline knowledge distillation with cached soft labels.

The project's three folders install under this one name, so that they never collide with a user's own ``data/``
package or ``pipeline.py``::

    kd_pipeline.data      the store: format, writer, reader, verify, the streaming torch dataset (folder data/)
    kd_pipeline.stages    label (teacher -> store), train (store -> student), the losses (folder stages/)
    kd_pipeline.pipeline  the click CLI, console script ``pipeline`` (folder pipeline/)

In the source tree the three entries here are links to the top-level folders; a built wheel holds copies.
Run the CLI as ``pipeline ...``, ``python -m kd_pipeline ...`` or ``torchrun ... -m kd_pipeline ...``.
"""

__version__ = "0.1.0"
