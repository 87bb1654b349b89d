"""The application's user errors: one base class, `UserError`, that every command's user-facing errors derive from.

`l1ra` (cli.py) reports a `UserError` as one line, `l1ra: error: <message>`, and exits with code 2; any other
exception is a bug and is reported with its type (and with `--debug`, its traceback). The message names the value
at fault and the fix. Each concern keeps its own subclass (e.g. `DataError`, `RunError`, `PlanError`) so that
callers and tests can catch one kind; they also derive from the built-in class they were before (ValueError or
RuntimeError), so `except ValueError` keeps working.

The library (`l1ra.*`) never imports the application: its own user-facing errors (`CheckpointError`, `ExportError`,
`DistributedSetupError`) are recognised by type in cli.py.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix: a bad flag, file, folder or missing package. One line, naming the fix."""
