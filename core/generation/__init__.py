"""Reply generation: one protocol, an in-process transformers backend, a vLLM backend."""

from core.generation.base import ChatMessage, GenerationError, GenerationParams, Generator

__all__ = ["ChatMessage", "GenerationError", "GenerationParams", "Generator"]
