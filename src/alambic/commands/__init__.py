"""Subcommands of the ``alambic`` command line that live outside ``cli.py`` (which holds the app, the
error handling and the older commands); ``cli.py`` registers each one with ``app.command()``."""
