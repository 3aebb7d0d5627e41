"""FaceBench harness: data, training loop, evaluation protocols, run records, reports and the CLI."""

__version__ = "0.1.0"
