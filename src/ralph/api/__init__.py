"""HTTP API. Only this package imports FastAPI."""
