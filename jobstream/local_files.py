"""Files a local stack (`jobstream up`) leaves for the CLI in its state folder: the dev tenant's API
key and the database URL, both readable by their owner only."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR = Path(".jobstream")
DEV_TOKEN_FILE = "dev-token"
DATABASE_URL_FILE = "database-url"


def write_secret(path: Path, text: str) -> None:
    """Writes `text` to `path` with mode 0600 from the first byte, replacing it whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    partial.replace(path)


def read_local(name: str, state_dir: Path = STATE_DIR) -> str:
    """The file's text, or "" when the stack has not written it."""
    try:
        return (state_dir / name).read_text().strip()
    except FileNotFoundError:
        return ""
