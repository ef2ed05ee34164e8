"""The yardstick: the least a FastAPI app can do for a request.

`bench/run.py` serves this with the same uvicorn settings as the service and reports every
service figure as a ratio to it, so a busy or slow machine moves both sides alike.
"""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI(title="bare")

HEALTH = {
    "status": "healthy",
    "message": "Customer Segmentation API is running",
    "version": "1.0.0",
    "model_loaded": True,
    "model_version": "bare",
}


@app.get("/")
async def health() -> dict:
    return HEALTH
