#!/usr/bin/env python3
"""MIG's command-line entry point: `./manage.py help` lists the commands."""

import os
import sys


def main():
    # Whatever MIG writes is its own: the config volume holds sessions, the password hash
    # and status tokens (see DESIGN.md, "Threat model").
    os.umask(0o077)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "migsite.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        # Load settings here so a bad variable is one clear line, not a traceback
        # or Django's "Unknown command".
        settings.INSTALLED_APPS  # noqa: B018
    except ImproperlyConfigured as e:
        sys.exit(f"mig: configuration error: {e}")
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
