"""Flask app for the gunicorn recipe (docs/servers.md)."""

from flask import Flask, Response

from compat_info import info, mark_loaded

app = Flask(__name__)


@app.get("/")
def index():
    return Response(info("gunicorn"), mimetype="application/json")


mark_loaded()
