"""CLI subcommands, one module each (see ``dsmoe.cli.COMMANDS``)."""
