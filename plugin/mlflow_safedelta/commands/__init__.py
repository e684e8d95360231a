"""CLI command modules. Each module imports ``cli`` and adds its thin commands to it."""
