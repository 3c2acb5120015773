"""Where hostprep's shipped data lives (templates, the sysctl profile, the SELinux module): a
lookup in the package, pure (nothing is read or written here)."""

from __future__ import annotations

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
