"""An OpenAI-compatible HTTP server over the generation package: the engine (engine.py, one
thread, continuous batching over state slots), the prefix-state cache (prefix_cache.py),
sessions (sessions.py), request checks and OpenAI's response shapes (protocol.py) and the
FastAPI app (app.py)."""
