from nanovllm.structured_output.manager import StructuredOutputManager

__all__ = ["StructuredOutputManager"]
