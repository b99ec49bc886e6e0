"""rsd-bench: a benchmark harness for exact speculative decoding (SD, SpecTr, RSD-C, RSD-S)."""

__version__ = "0.1.0"

from .engine import GenerationResult, PromptTooLongError, generate  # noqa: E402
from .methods import Method, available_methods, get_method, register  # noqa: E402
from .pair import Pair, TokenizerMismatchError, load_pair  # noqa: E402

__all__ = ["GenerationResult", "Method", "Pair", "PromptTooLongError", "TokenizerMismatchError",
           "available_methods", "generate", "get_method", "load_pair", "register"]
