"""Sub-commands that live in their own modules: each exposes ``register(subparsers)`` (cli.py calls it for each module in its COMMAND_MODULES)."""
