"""
MigHelper: the program that copies an app, run as an app of its own on the target grid.

MIG lives inside the app it moves; stopping the app stops MIG. So MIG provisions this helper
on the target grid and the helper does the copy: live pre-copy, stop the source, final
pass, verify, then start the target (migrate) or restart the source (snapshot).

Django-free: it runs on grid hosts with Python's standard library, the grids package, rsync
and the OpenSSH client.
"""
