"""infer.py serve: one local server for a run's tuned and base models (and "tuned+rag", the tuned one searching the
catalogue), an OpenAI-compatible API and a playground. One job per module, each importing only those above it here:

    protocol.py      the OpenAI chat completions request: `parse` into a `Chat`; `ApiError`, every refusal
    models.py        what is served: each GGUF loaded once behind its own lock and queue (`Model`), the "tuned+rag"
                     index (`Rag`), and `Served`, built by `load`
    generation.py    one chat completion: the checks before it queues (`prepare`), the worker (`Generation`), and
                     the OpenAI response, whole (`answer`) or streamed (`events`)
    asgi.py          `Guard` (API key, Host header, body type, size and time, security headers) and `Stream`
    app.py           the routes (`create_app`) and the start: `api_key`, `check`, `listen`, `banner`, `run`
    playground.html  the page served at /

Limits and their reasons are in config.py (SERVE_*).
"""
