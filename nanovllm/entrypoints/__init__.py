"""Front ends over the engine: the `nanovllm` command line and the OpenAI-compatible server."""
