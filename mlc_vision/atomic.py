"""Outputs that appear whole or not at all, and never cost the previous good one.

Every output (a params dir, a library and its ``<lib>.json``, a features
``.npy``) is written under a temporary sibling name and moved into place only
when complete:

* a single file: ``os.replace`` (atomic on POSIX);
* a directory that replaces an older one: the two are exchanged in one step
  (Linux ``renameat2(RENAME_EXCHANGE)``); where the filesystem cannot
  exchange, the old one is renamed aside and the new one renamed in, under a
  *journal*;
* several files that belong together (a library and its JSON): under a
  journal.

A journal (``.NAME.commit-PID-XXXXXXXX.json``) is written, atomically, once
every temporary is complete and lists the renames still to do. A run that
dies mid-swap leaves it behind, and the next run to the same output rolls it
forward: the new output was complete, so finishing the renames loses nothing.

Temporary names carry the writer's pid (``.NAME.tmp-PID-XXXXXXXX``,
``.NAME.old-PID-XXXXXXXX``). :func:`recover`, called by every command before
it writes an output, removes those whose process is gone (or that are older
than a day, in case the pid was reused), and the unnamed-pid leftovers of
earlier versions (``.NAME.XXXXXXXX.partial.so``, ``mkdtemp`` dirs) once they
are an hour old. New files and directories get the process umask's modes.

Test hook: when the environment variable ``MLC_VISION_TEST_DIE_AT`` names a
phase (:data:`PHASES`), the process kills itself with SIGKILL on reaching it.
Nothing else reads that variable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import MlcVisionError

TEST_DIE_AT_ENV = "MLC_VISION_TEST_DIE_AT"

#: Where a run can be killed, in order: ``writing`` (temporaries half written),
#: ``before-swap`` (temporaries complete, nothing moved), ``mid-swap`` (after
#: the first rename of several), ``after-swap`` (all in place, old copies and
#: the journal not yet removed).
PHASES = ("writing", "before-swap", "mid-swap", "after-swap")

#: Leftovers with a pid are removed once that process is gone or after this long.
STALE_WITH_PID_S = 24 * 3600
#: Leftovers of earlier versions (no pid in the name) are removed after this long.
STALE_WITHOUT_PID_S = 3600

_OURS = re.compile(r"\.(?P<kind>tmp|old|commit)-(?P<pid>\d+)-[0-9a-f]{8}")
_LEGACY = re.compile(r"\.(?:(?:tmp|old)-[a-z0-9_]{8}|[0-9a-f]{8}\.partial(?:\.\w+)?)$")

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def die_point(phase: str) -> None:
    """The test hook: SIGKILL this process when ``MLC_VISION_TEST_DIE_AT`` is ``phase``."""
    if os.environ.get(TEST_DIE_AT_ENV) == phase:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ---- names ---------------------------------------------------------------------------------


def _sibling(output: Path, kind: str, suffix: str = "") -> Path:
    return output.with_name(f".{output.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def temp_path(output: str | Path, keep_suffix: bool = False) -> Path:
    """A unique temporary sibling of ``output``; ``keep_suffix`` ends it like ``output`` (``.so``, ``.tar``)."""
    output = Path(output)
    suffix = ""
    if keep_suffix:
        suffix = ".tar" if output.name.endswith(".tar") else output.suffix
    return _sibling(output, "tmp", suffix)


def make_temp_dir(output: str | Path) -> Path:
    """A new empty temporary sibling directory of ``output`` (mode from the umask, unlike ``mkdtemp``)."""
    path = temp_path(output)
    os.mkdir(path, 0o777)
    return path


# ---- checks before work ----------------------------------------------------------------------


def check_writable(output: str | Path, *, directory: bool = False, what: str = "output") -> Path:
    """Refuse an ``output`` that cannot be written, before any work is done.

    ``output`` may not exist yet; its nearest existing ancestor must be a
    directory we can create files in. An existing ``output`` must be a file
    (or, with ``directory``, a directory).
    """
    output = Path(output).absolute()
    if output.exists():
        if directory and not output.is_dir():
            raise MlcVisionError(f"{what} {output} exists and is not a directory")
        if not directory and output.is_dir():
            raise MlcVisionError(f"{what} {output} is a directory; give a file name")
    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MlcVisionError(f"{what} {output} is under {ancestor}, which is a file, not a directory")
    try:
        probe = _sibling(ancestor / "probe", "tmp")
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise MlcVisionError(f"{what} {output} cannot be written: {err.strerror or err} ({ancestor})") from None
    return output


# ---- committing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    """One rename of a complete temporary onto its destination (``old``: where a replaced dir goes)."""

    src: Path
    dst: Path
    old: Path | None = None

    def to_json(self) -> dict:
        return {"src": self.src.name, "dst": self.dst.name, "old": self.old.name if self.old else None}

    @classmethod
    def from_json(cls, parent: Path, data: dict) -> "Move":
        old = data.get("old")
        return cls(parent / data["src"], parent / data["dst"], parent / old if old else None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(tmp: Path, output: Path) -> Path:
    """Move the complete directory ``tmp`` onto ``output``, replacing an older one atomically."""
    tmp, output = Path(tmp), Path(output)
    die_point("before-swap")
    if not output.exists():
        os.rename(tmp, output)
    elif _exchange(tmp, output):
        _fsync_dir(output.parent)
        die_point("after-swap")
        shutil.rmtree(tmp, ignore_errors=True)  # the old output, now under the temporary name
    else:
        commit([Move(tmp, output, _sibling(output, "old"))])
        return output
    _fsync_dir(output.parent)
    return output


def commit(moves: list[Move]) -> None:
    """Rename every complete temporary into place; a run killed midway is finished by :func:`recover`."""
    if not moves:
        return
    parent = moves[0].dst.parent
    journal = _sibling(moves[0].dst, "commit", ".json")
    journal_tmp = _sibling(moves[0].dst, "tmp", ".json")
    _write_synced(journal_tmp, json.dumps({"moves": [m.to_json() for m in moves]}).encode())
    os.replace(journal_tmp, journal)
    _fsync_dir(parent)
    die_point("before-swap")
    _roll_forward(moves)
    _fsync_dir(parent)
    die_point("after-swap")
    for move in moves:
        if move.old is not None:
            shutil.rmtree(move.old, ignore_errors=True)
    journal.unlink(missing_ok=True)


def _roll_forward(moves: list[Move]) -> None:
    """Do the renames not done yet: a move is pending while its temporary exists."""
    for index, move in enumerate(moves):
        if not move.src.exists():
            continue
        if move.old is not None and move.dst.exists() and not move.old.exists():
            os.rename(move.dst, move.old)
            die_point("mid-swap")
        os.replace(move.src, move.dst)
        if index == 0 and len(moves) > 1:
            die_point("mid-swap")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file(output: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``output`` atomically (a temporary sibling, then ``os.replace``)."""
    output = Path(output)
    recover(output)
    tmp = temp_path(output)
    try:
        _write_synced(tmp, data)
        die_point("before-swap")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


# ---- recovery ----------------------------------------------------------------------------------


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _is_stale(path: Path, pid: int) -> bool:
    return not _process_alive(pid) or _age_s(path) > STALE_WITH_PID_S


def _leftover_kind(path: Path, output: Path) -> str | None:
    """``tmp``/``old``/``commit``/``legacy-old`` for a stale leftover of a run writing ``output``, else None."""
    prefix = f".{output.name}"
    if not path.name.startswith(prefix):
        return None
    rest = path.name[len(prefix) :]
    match = _OURS.match(rest)
    if match:
        return match["kind"] if _is_stale(path, int(match["pid"])) else None
    if _LEGACY.fullmatch(rest) and _age_s(path) > STALE_WITHOUT_PID_S:
        return "legacy-old" if rest.startswith(".old-") else "tmp"
    return None


def recover(output: str | Path) -> None:
    """Finish the swaps that dead runs to ``output`` began, then remove their leftovers."""
    output = Path(output).absolute()
    parent = output.parent
    if not parent.is_dir():
        return
    entries = sorted(parent.iterdir())
    for journal in entries:
        if journal.name.endswith(".json") and _is_stale_journal(journal):
            _finish_journal(journal, output)
    for path in entries:
        kind = _leftover_kind(path, output)
        if kind == "legacy-old" and not output.exists() and (path / "params").is_dir():
            os.rename(path / "params", output)  # an earlier version died between its two renames
        if kind is not None and kind != "commit":
            _remove(path)


def _is_stale_journal(path: Path) -> bool:
    match = _OURS.search(path.name)
    return bool(match and match["kind"] == "commit" and _is_stale(path, int(match["pid"])))


def _finish_journal(journal: Path, output: Path) -> None:
    """Roll a dead run's journal forward when one of its moves lands on ``output``."""
    try:
        moves = [Move.from_json(journal.parent, m) for m in json.loads(journal.read_text())["moves"]]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        moves = None  # written atomically, so unreadable means not ours: leave it
    if not moves or all(move.dst != output for move in moves):
        return
    _roll_forward(moves)
    for move in moves:
        if move.old is not None:
            shutil.rmtree(move.old, ignore_errors=True)
    journal.unlink(missing_ok=True)
