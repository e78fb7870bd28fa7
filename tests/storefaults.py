"""Stores that fail as a user meets them: a read-only file (even for root) and a damaged one.

Root ignores file modes, so ``chmod`` alone leaves a store writable in a container run as root;
``chattr +i`` (immutable) refuses the write to everyone. Where neither works (root without
chattr), `freeze` says so and the caller skips.
"""
import os
import subprocess
from pathlib import Path


def freeze(path: Path) -> bool:
    """Make ``path`` refuse writes (chattr +i, or chmod for a non-root user); False when neither can."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return True
    if os.geteuid() != 0:
        path.chmod(0o444)
        return True
    return False


def thaw(path: Path) -> None:
    """Undo `freeze` (so pytest can remove the folder)."""
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    if path.exists():
        path.chmod(0o644)


def damage(path: Path) -> None:
    """Garbage where a SQLite file should be (the header SQLite checks first included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00garbage, not a database\xff" * 200)
