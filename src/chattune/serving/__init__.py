"""The serving layer: the OpenAI-compatible HTTP app of `chattune serve` (FastAPI, SSE streaming, errors in
OpenAI's shape) and its chat page (static/index.html). Generation is the inference layer's batching Engine."""
