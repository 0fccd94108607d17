"""``python -m service serve|worker``: the service commands without the core CLI."""

from __future__ import annotations

import typer

from service.cli import register

app = typer.Typer(add_completion=False, no_args_is_help=True)
register(app)

if __name__ == "__main__":
    app()
