"""Feather gRPC: an LLM gateway served over gRPC. The engine is usable in-process as a library."""

__version__ = "0.1.0"
