"""`qwen3 serve`: an OpenAI-compatible HTTP server (and `qwen3 batch`) on the engine's streaming interface.

Modules: `protocol` (the request schemas and error shape), `serving` (request -> prompt and sampling
parameters, outputs -> response bodies; shared by the server and `qwen3 batch`), `parsers` (reasoning and
tool calls split out of the streamed text), `metrics` (Prometheus), `app` (the FastAPI app and the uvicorn
runner), `batch` (OpenAI Batch API files, offline), `cli` (the two subcommands), `static/index.html` (the
chat page). Nothing here is imported by `import qwen3`: FastAPI and uvicorn are the `serve` extra.
"""
