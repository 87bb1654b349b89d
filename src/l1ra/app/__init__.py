"""The l1ra application: the `train` and `compare` recipes, their data, reports, serving helpers and the CLI.

Built on the library (`import l1ra`) and never imported by it.
"""
