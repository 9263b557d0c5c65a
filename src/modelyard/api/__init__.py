"""The HTTP edge: FastAPI app, request schema, SSE framing and error mapping."""
