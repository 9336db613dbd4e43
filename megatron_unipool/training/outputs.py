"""Files the tools write: an output location is checked before the long work that fills it, and
each file is replaced whole, so a failure leaves the previous one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def check_output_directory(directory: Path, named: str) -> None:
    """A ValueError now, not a traceback after the work, when `directory` cannot be made or written: a
    file in its way, or a nearest existing directory that takes no file. `named` is how the user gave
    it (e.g. "--output runs/x"). Creates nothing: a command refused later leaves no directory behind."""
    directory = Path(directory)
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{named}: {existing} is a file, not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ValueError(f"{named}: cannot write in {existing} ({error.strerror or error})") from error


def save_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """write(a temporary path in the same directory), then rename it to `path`: a reader, or a crash,
    never sees a half-written file, and a failed write leaves the previous one. A writer that picks
    the format from the suffix (savefig) must be given it: the temporary name ends in .tmp."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
