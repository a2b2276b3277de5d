"""Test settings: MIG's settings on a throw-away config volume."""

import atexit
import os
import shutil
import tempfile

os.environ["MIG_CONFIG_DIR"] = tempfile.mkdtemp(prefix="mig-test-config-")
# It holds a generated password and secret key: gone with the process that made it.
atexit.register(shutil.rmtree, os.environ["MIG_CONFIG_DIR"], ignore_errors=True)
for name in ("MIG_USERNAME", "MIG_PASSWORD", "MIG_MODE", "MIG_GRID", "MIG_APP", "SECRET_KEY"):
    os.environ.pop(name, None)

from migsite.settings import *  # noqa: E402,F403

# A file in WAL mode, as MIG's database is: the in-memory database Django tests on by default
# shares one cache between connections, and answers a second writer "database table is
# locked" at once, where MIG's waits its busy timeout (two submits at once, test_index_view).
DATABASES["default"]["TEST"] = {"NAME": os.path.join(os.environ["MIG_CONFIG_DIR"], "test.sqlite3")}  # noqa: F405

# Hashing is deliberately slow; the tests need it correct, not slow.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
