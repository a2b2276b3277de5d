"""Asking before a command changes something."""

import sys

from django.core.management.base import CommandError


def confirm(question: str, no_terminal: str):
    """Ask `question` (y/N) on the terminal; raise CommandError unless the answer is yes.
    Without a terminal there is nobody to ask: `no_terminal` says what to do instead."""
    if not sys.stdin.isatty():
        raise CommandError(no_terminal)
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandError("not done: nothing was changed")
