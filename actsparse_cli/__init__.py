"""Typer command-line interface for actsparse (a thin layer over ``probes`` and ``reports``)."""
