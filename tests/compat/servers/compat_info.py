"""What every compatibility-suite app answers, and the "app loaded" marker (suite only)."""

import json
import os


def info(server):
    return json.dumps({
        "server": server,
        "pid": os.getpid(),
        "worker_id": int(os.environ.get("HERDSMAN_WORKER_ID", "-1")),
        "generation": int(os.environ.get("HERDSMAN_GENERATION", "-1")),
    })


def mark_loaded():
    """The suite checks that herdsman saw READY=1 only after this ran (the app was imported)."""
    d = os.environ.get("COMPAT_MARK_DIR")
    if d:
        gen, wid = os.environ["HERDSMAN_GENERATION"], os.environ["HERDSMAN_WORKER_ID"]
        open(os.path.join(d, f"loaded-{gen}-{wid}"), "w").close()
