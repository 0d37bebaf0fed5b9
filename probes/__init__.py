"""actsparse library: load checkpoints, find activation sites, stream probes over a corpus.

Importable without typer or rich. The CLI in ``actsparse_cli`` is a thin layer over it.
"""

__version__ = "0.1.0"

from probes.errors import ActsparseError  # noqa: F401
