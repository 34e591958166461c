"""What every `recsqueeze` subcommand shares: the console for messages, the --state-dir option."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

err = Console(stderr=True)  # messages; stdout is kept for results (a URI, JSON)
STATE = typer.Option(Path(".recsqueeze"), "--state-dir", envvar="RECSQUEEZE_STATE_DIR",
                     help="local stack state directory")
