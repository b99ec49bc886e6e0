"""rsd-bench: a benchmark harness for exact speculative decoding (SD, SpecTr, RSD-C, RSD-S)."""

__version__ = "0.1.0"
