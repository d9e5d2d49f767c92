"""Subcommands of the ``fastvmt`` CLI; each module exposes ``add_arguments(parser)`` and ``run(args) -> int``."""
