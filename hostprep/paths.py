"""Every path hostprep reads or writes goes through one root prefix.

``HOSTPREP_ROOT`` (default ``/``) lets tests and the sandbox demo keep their
state under a temporary directory instead of the real /etc, /var/lib, /var/log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Locate a shipped data directory (``rules`` or ``sysctl.d``).

    Installed wheels carry them as ``hostprep/rules`` and ``hostprep/sysctl_d``;
    a source checkout has them at the top level beside the package.
    """
    installed = PACKAGE_DIR / name.replace(".", "_")
    if installed.is_dir():
        return installed
    return PACKAGE_DIR.parent / name


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(Path(os.environ.get("HOSTPREP_ROOT", "/")))

    @property
    def etc(self) -> Path:
        return self.root / "etc/hostprep"

    @property
    def settings_file(self) -> Path:
        return self.etc / "settings.json"

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/hostprep"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "applied.json"

    @property
    def log_dir(self) -> Path:
        return self.root / "var/log/hostprep"

    @property
    def journal(self) -> Path:
        return self.log_dir / "journal.log"
