#!/usr/bin/env python3
"""Pid-reuse harness for herdsman (run as pid 1 of a new pid namespace, as root):

    unshare --pid --fork --mount-proc python3 pid_reuse.py HERDSMAN WORKDIR

Starts herdsman with one worker whose output stays open after it exits (a grandchild in
another session holds the pipes), so herdsman waits for the output before it reports the
exit. As soon as the worker's pid is released (reaped), the harness forces the next pid to be
that one (ns_last_pid) and forks a "victim" that makes itself a process-group leader — an
unrelated process that now owns the dead worker's pid and pgid. Once herdsman has handled the
exit (the slot shows `backoff`), the victim must still be alive: herdsman must never signal a
pid it has already released.

Exit status: 0 victim alive, 1 victim killed, 77 the pid could not be reused (skip), 2 error.
"""
import json
import os
import subprocess
import sys
import time

herdsman, work = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 30


def wait(what, cond):
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            print(f"timed out waiting for {what}", file=sys.stderr)
            sys.exit(2)
        time.sleep(0.0005)


wpid = os.path.join(work, "wpid")
script = f"echo $$ > {wpid}.tmp && mv {wpid}.tmp {wpid}; setsid sleep 60 & exec sleep 0.3"
with open(os.path.join(work, "app.toml"), "w") as f:
    f.write(f'''name = "pidreuse"
command = ["/bin/sh", "-c", {json.dumps(script)}]
workers = 1
listen = ["unix:{work}/app.sock"]
control = "{work}/control.sock"
ready = "alive:50ms"
backoff_initial = "1h"
backoff_max = "1h"
''')
log = open(os.path.join(work, "herdsman.log"), "w")
sup = subprocess.Popen([herdsman, "run", "--config", os.path.join(work, "app.toml")],
                       stdout=log, stderr=log, stdin=subprocess.DEVNULL)

pid = int(wait("the worker's pid", lambda: os.path.exists(wpid) and open(wpid).read().strip()))
wait("the worker's pid to be released", lambda: not os.path.exists(f"/proc/{pid}"))
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(pid - 1))
victim = os.fork()
if victim == 0:
    os.setsid()
    time.sleep(60)
    os._exit(0)
if victim != pid:
    print(f"could not reuse pid {pid} (got {victim})", file=sys.stderr)
    sys.exit(77)


def slot_in_backoff():
    out = subprocess.run([herdsman, "status", f"{work}/control.sock", "--json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return False
    return any(w["state"] == "backoff" for w in json.loads(out.stdout)["workers"])


wait("herdsman to handle the exit", slot_in_backoff)
done, status = os.waitpid(victim, os.WNOHANG)
print(f"worker pid {pid} reused by the victim; victim {'killed' if done else 'alive'}")
sys.exit(1 if done else 0)
