"""Where things live in a server's workdir: one class names every file, so no name is spelled twice.

The server CLI, the ServerApp, the run state for `--resume`, the operator's status view and the
local-federation launcher all read and write the same workdir; each asks this class for a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerWorkdir:
    root: Path

    @property
    def ready(self) -> Path:
        """Written once the SuperLink is up and the site keys are registered: sites may connect now."""
        return self.root / "superlink.ready"
