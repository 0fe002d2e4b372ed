"""The studio home: one folder that holds the adapter library, the job database, caches and outputs.

Resolution order: an explicit path (``--home``), then ``STUDIO_HOME``, then ``./studio-home``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "STUDIO_HOME"
DEFAULT_HOME = "studio-home"


@dataclass(frozen=True)
class StudioHome:
    """Paths inside a studio home. Nothing is created until `ensure()` is called.

    >>> home = StudioHome(Path("/tmp/my-home"))
    >>> home.adapters.name
    'adapters'
    """

    root: Path

    @property
    def adapters(self) -> Path:
        """The adapter library: one ``<name>.safetensors`` per adapter (full fine-tunes: a folder)."""
        return self.root / "adapters"

    @property
    def jobs_db(self) -> Path:
        """The SQLite job database."""
        return self.root / "jobs.sqlite3"

    @property
    def runs(self) -> Path:
        """Training run folders (checkpoints, samples, logs), one per run."""
        return self.root / "runs"

    @property
    def cache(self) -> Path:
        """Caches that can be deleted at any time (class images, fingerprints, latents)."""
        return self.root / "cache"

    @property
    def outputs(self) -> Path:
        """Generated images."""
        return self.root / "outputs"

    @property
    def preferences(self) -> Path:
        """Preference pairs collected per user."""
        return self.root / "preferences"

    def ensure(self) -> StudioHome:
        """Create the folders (idempotent) and return self."""
        for path in (self.adapters, self.runs, self.cache, self.outputs, self.preferences):
            path.mkdir(parents=True, exist_ok=True)
        return self


def resolve_home(explicit: str | os.PathLike[str] | None = None) -> StudioHome:
    """Return the studio home from ``--home``, else ``$STUDIO_HOME``, else ``./studio-home``."""
    if explicit:
        return StudioHome(Path(explicit).expanduser().resolve())
    env = os.environ.get(ENV_VAR)
    if env:
        return StudioHome(Path(env).expanduser().resolve())
    return StudioHome((Path.cwd() / DEFAULT_HOME).resolve())
