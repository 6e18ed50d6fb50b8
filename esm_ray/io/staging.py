"""Hidden siblings of a local output while it is written, named after the process that owns them.

A local output `<dir>/<name>` is built in `<dir>/.<name>.partial-<owner>-<random>` and, at
commit, an existing output is moved aside to `<dir>/.<name>.old-<owner>-<random>` until the new
one has been renamed into place. `<owner>` is `<host tag>-<pid>-<process start>`: the owner is
part of the name from the moment the directory exists, so a writer killed at any instant leaves
nothing whose owner is unknown. The next write of the same output on the same host
(`recover_leftovers`) then:

- removes every `.partial-*` and `.old-*` of `<name>` whose owner is dead (pid gone, or reused
  by a process with another start time);
- first puts a dead commit's `.old-*` back in place when the output is missing and that
  commit's `.partial-*` is still there: the commit was killed between moving the old output
  aside and renaming the new one in, so the old output is restored whole.

Owners on other hosts (a shared file system) cannot be checked from here and are left alone,
as are directories of other names. Staging directories of earlier versions carry their owner
in a `.esm-ray-owner.json` record instead; it is still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
from glob import escape as glob_escape
from pathlib import Path

__all__ = ["make_staging", "aside_path", "recover_leftovers", "dead_owner", "remove_tree"]

log = logging.getLogger("esm_ray.io.writer")

_OWNER = ".esm-ray-owner.json"  # the owner record of staging directories of earlier versions
_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-"
                   r"(?P<start>\d+)-(?P<rand>[0-9a-f]+)$")


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux /proc, in clock ticks since boot), '' where /proc
    is missing but the process exists, None when there is no such process."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except (OSError, ValueError):
        pass
    return ""


def _host_tag(host: str | None = None) -> str:
    return hashlib.sha256((host or socket.gethostname()).encode()).hexdigest()[:8]


def _owner() -> dict[str, object]:
    """This process as an owner record (host, pid, start time)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}


def _owner_token() -> str:
    return f"{_host_tag()}-{os.getpid()}-{_process_start(os.getpid()) or 0}"


def _sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{_owner_token()}-{secrets.token_hex(4)}"


def make_staging(final: Path) -> Path:
    """Create the staging directory of `final` (mode from the umask, like any directory)."""
    while True:
        p = _sibling(final, "partial")
        try:
            os.mkdir(p)
            return p
        except FileExistsError:
            continue


def aside_path(final: Path) -> Path:
    """Where a commit of this process moves the existing output before renaming the new one in."""
    return _sibling(final, "old")


def _dead(host: str, pid: int, start: str) -> bool:
    if host != _host_tag():
        return False
    now = _process_start(pid)
    return now is None or bool(now and start and start != "0" and now != start)


def dead_owner(d: Path) -> int | None:
    """The pid of the dead process that left the staging or moved-aside directory `d`, or None
    when it may still be alive or its owner is unknown (another host, no owner in name or record)."""
    m = _NAME.match(d.name)
    if m is not None:
        pid = int(m["pid"])
        return pid if _dead(m["host"], pid, m["start"]) else None
    try:
        rec = json.loads((d / _OWNER).read_text())
        pid = int(rec["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if rec.get("host") != socket.gethostname():
        return None
    start = _process_start(pid)
    return pid if start is None or (start and rec.get("start") and start != rec.get("start")) else None


def remove_tree(p: Path) -> None:
    """Remove a directory tree (or a link or file) without following links; errors ignored."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:
            pass


def _ours(final: Path, kind: str) -> list[tuple[Path, str, int]]:
    """(path, owner token, pid) of the dead `kind` siblings of `final`."""
    out = []
    for d in sorted(final.parent.glob(f".{glob_escape(final.name)}.{kind}-*")):
        m = _NAME.match(d.name)
        if m is not None and m["name"] != final.name:
            continue
        if not d.is_dir() or d.is_symlink():
            continue
        pid = dead_owner(d)
        if pid is not None:
            token = f"{m['host']}-{m['pid']}-{m['start']}" if m else ""
            out.append((d, token, pid))
    return out


def recover_leftovers(final: Path) -> list[Path]:
    """Clean up after writers of `final` on this host that were killed (see the module
    docstring); return the directories removed or restored."""
    done = []
    partials = _ours(final, "partial")
    for old, token, pid in _ours(final, "old"):
        if not (final.exists() or final.is_symlink()) and any(t == token for _, t, _ in partials):
            try:
                os.rename(old, final)
                log.warning("%s: put back the output that a commit (pid %d) killed before it finished "
                            "had moved aside to %s", final, pid, old.name)
                done.append(old)
                continue
            except OSError:
                if not (final.exists() or final.is_symlink()):
                    continue  # could not put it back: leave it for the next try
        remove_tree(old)
        done.append(old)
        log.warning("%s: removed %s, an old output that a commit (pid %d) had replaced but was killed "
                    "before removing", final, old.name, pid)
    for d, _, pid in partials:
        remove_tree(d)
        done.append(d)
        log.warning("%s: removed %s, the staging directory of an earlier write (pid %d) that was "
                    "killed before it finished", final, d.name, pid)
    return done
