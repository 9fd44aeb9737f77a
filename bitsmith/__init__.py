"""bitsmith: a compiler for LLM inference (checkpoint in, quantized artifact + small runtime out)."""

__version__ = "0.1.0"
