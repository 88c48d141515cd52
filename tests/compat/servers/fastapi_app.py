"""FastAPI app for the FastAPI recipe (docs/servers.md), served by examples/uvicorn_fd3.py."""

from fastapi import FastAPI, Response

from compat_info import info, mark_loaded

app = FastAPI()


@app.get("/")
def index():
    return Response(info("fastapi"), media_type="application/json")


mark_loaded()
