"""
MIG's agent: does the operations of a grid on the grid's own host, with the Python
standard library only.

MIG installs it as one file, a zip archive of this package, at <root>/.mig/agent-<version>.pyz
and runs it through a transport:

    python3 agent.pyz ROOT OPERATION [ARGS...]

It prints one JSON object, {"ok": true, "result": ...} or {"ok": false, "error": KIND,
"message": ...}, except the streaming operations (follow, scan, delta) and the long-lived
ones it starts itself (supervise, a component's supervisor; watchdog, a cut-over's). `serve`
answers many operations, one per line: each request is a JSON list [OPERATION, ARGS...],
or, for `put`, {"argv": [OPERATION, ARGS...], "input": BASE64} (what the one-off agent reads
from stdin), each answer that JSON object; one connection and one interpreter then serve a
whole job.

A grid is a directory:
    grid.json                   the grid's own name, app URL and app ports (written by `init`)
    catalog/<template>/         manifest.json and volumes/<name>/ with initial content
    apps/<app>/app.json         the manifest (and the app's port); an app exists once this file does
    apps/<app>/state.json       the desired state: running or stopped
    apps/<app>/volumes/<name>/  the app's data
    apps/<app>/run/<c>.pid      "<pid> <start time>" of each running component
    apps/<app>/run/<c>.env      what the component was told (MIG_GRID, MIG_APP, MIG_APP_URL, ...)
    apps/<app>/logs/<c>.log     each component's output
    apps/<app>/secrets/         files MIG puts there (mode 0600), never in a manifest
    apps/<app>/cutover/         the cut-over record of a migration from this app (see cutover.py)

Modules: base (errors, names, files), procs (processes), grid (the directory, manifests),
cutover (the cut-over record), tree (the tree-sync protocol, both sides), ops (operations,
command line, serving).
"""
