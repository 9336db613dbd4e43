"""Files the tools write: an output location is checked before the long work that fills it, and
each file or directory is replaced whole, so a failure leaves the previous one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional


def check_output_directory(directory: Path, named: str) -> None:
    """A ValueError now, not a traceback after the work, when `directory` cannot be made or written: a
    file in its way, or a nearest existing directory that takes no file. `named` is how the user gave
    it (e.g. "--output runs/x"). Creates nothing: a command refused later leaves no directory behind."""
    directory = Path(directory)
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{named}: {existing} is a file, not a directory")
    refusal = write_refusal(existing)
    if refusal:
        raise ValueError(f"{named}: cannot write in {existing} ({refusal})")


def check_output_file(path: Path, named: str) -> None:
    """check_output_directory for the file's folder, and a ValueError for a directory where the file would go."""
    if Path(path).is_dir():
        raise ValueError(f"{named}: {path} is a directory, not a file")
    check_output_directory(Path(path).parent, named)


def write_refusal(directory: Path) -> Optional[str]:
    """Why no file can be made in `directory` (a permission, a read-only file system), or None: tried, as
    os.access says yes to root and knows nothing of the file system."""
    try:
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as error:
        return str(error.strerror or error)
    return None


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


def write_json_report(path: Path, report: dict) -> None:
    """A tool's --json report, in folders made as needed, replaced whole (save_atomically); says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2)
    save_atomically(path, lambda temporary: temporary.write_text(text))
    print(f"wrote {path}")


def check_replaceable_output(output: Path, sources: list[Path], force: bool) -> None:
    """A ValueError for an --output that `write_directory` must not replace: one holding an input (each of
    `sources`) or the directory the command runs in, or, without `force`, one that is not empty."""
    for source in sources:
        if Path(source).resolve().is_relative_to(output.resolve()):
            raise ValueError(f"--output {output} holds the --checkpoint {source}; choose another --output")
    if Path.cwd().is_relative_to(output.resolve()):
        raise ValueError(f"--output {output} holds the directory this command runs in; choose a new directory")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise ValueError(f"{output} exists and is not empty; choose a new --output or pass --force to replace it")


def _replaced_paths(output: Path) -> tuple[Path, Path, Path]:
    """(the output, written through a symlink to where it points; the temporary directory; the old output
    moved aside), the last two beside the first."""
    output = Path(output)
    output = output.resolve() if output.is_symlink() else output
    return output, output.parent / f".{output.name}.tmp", output.parent / f".{output.name}.old"


def recover_replaced_directory(output: Path) -> None:
    """Put back an output that a process killed between write_directory's two renames left aside; tools call
    it before they check the output, so that those checks see it."""
    output, _, previous = _replaced_paths(output)
    if previous.exists() and not output.exists():
        previous.rename(output)


def write_directory(output: Path, fill: Callable[[Path], object]) -> None:
    """Call fill(a temporary directory beside `output`), then put that directory at `output` (where a
    symlink there points). What was there is moved aside first and deleted once the new directory
    stands in its place: an interrupt leaves one of them whole at `output`."""
    recover_replaced_directory(output)
    output, temporary, previous = _replaced_paths(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (temporary, previous):
        remove(leftover)
    temporary.mkdir()
    try:
        fill(temporary)
        if output.exists():
            output.rename(previous)
        temporary.rename(output)
    except BaseException:
        if previous.exists() and not output.exists():
            previous.rename(output)
        raise
    finally:
        remove(temporary)
    remove(previous)


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
