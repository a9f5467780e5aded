"""The run directory: ``run.json``, the append-only ``manifest.jsonl`` and the image folders.

Crash safety: images are written to a temporary file and renamed; a manifest record is one
``write()`` of one complete line, appended only after its images exist, then fsync'ed. Resuming
drops a torn last line and ``error`` records (those inputs are retried), rewriting the manifest
atomically, so a resumed run ends with exactly one record per input.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfx_cli.atomic import atomic_write
from cfx_cli.errors import MetricUnavailable, UsageError
from cfx_cli.images import load_png, safe_child

if TYPE_CHECKING:
    import numpy as np

MANIFEST = "manifest.jsonl"
RUN_JSON = "run.json"
IMAGE_DIRS = ("originals", "counterfactuals", "masks")
SEEDS_DIR = "seeds"  # --seeds N: RUN_DIR/seeds/K (K = 1 … N−1) are complete runs of their own
STATUSES = ("flipped", "not_flipped", "skipped", "error")


@dataclass
class Record:
    """One line of ``manifest.jsonl``: one input's outcome. The field order is the JSON key order on disk."""

    id: str
    source: str
    status: str | None = None  # one of STATUSES once finished
    error: str | None = None
    source_label: str | None = None
    source_prob: float | None = None
    target_label: str | None = None
    target_prob_before: float | None = None
    target_prob_after: float | None = None
    cf_label: str | None = None
    counterfactual: str | None = None  # paths relative to the run directory
    original: str | None = None
    mask: str | None = None
    params: dict[str, Any] | None = None  # the attempt that produced the counterfactual
    seed: int | None = None
    seconds: float | None = None
    nfe: int | None = None
    # issue 18, appended so the earlier keys keep their order:
    #: [H, W] of the input file as decoded, and of the saved original/counterfactual (the method's working size)
    source_size: list[int] | None = None
    size: list[int] | None = None
    #: [top, left, H, W] of the input (in its pixels) that the centre crop kept; None = all of it
    crop: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RECORD_FIELDS}


RECORD_FIELDS = tuple(f.name for f in fields(Record))


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def seed_run_dirs(path: str | Path) -> list[Path]:
    """The per-seed sub-runs of a run (RUN_DIR/seeds/K that hold a manifest), in K order."""
    root = Path(path) / SEEDS_DIR
    if not root.is_dir():
        return []
    subs = [p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).exists()]
    return sorted(subs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def process_info() -> dict[str, Any]:
    """Who is writing a run: recorded in run.json while its status is ``running``, so that a later ``--resume`` or
    ``cfx eval`` can tell a run still in progress from one whose process was killed."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_started": _pid_start(os.getpid())}


def _pid_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces
    except (IndexError, ValueError):
        return None


def run_state(info: dict) -> str:
    """``finished``; ``running`` (its process on this host is alive); ``running_elsewhere`` (on another host, or
    no process recorded: cannot be checked from here); ``interrupted`` (status ``running`` but its process on
    this host is gone: killed, crashed, power lost); ``unknown`` (no status: a run.json from before cfx
    recorded one)."""
    status = info.get("status")
    if status != "running":
        return status or "unknown"
    proc = info.get("process") or {}
    pid, host = proc.get("pid"), proc.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return "running_elsewhere"  # another machine (or no record): cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "interrupted"
    except PermissionError:
        pass  # alive, another user's
    started = proc.get("pid_started")
    if started is not None and _pid_start(pid) not in (None, started):
        return "interrupted"  # the pid now belongs to another process
    return "running"


def state_line(path: str | Path, info: dict, records: int) -> str | None:
    """A one-line description of a run that did not finish (for ``cfx eval`` and ``--resume``), else None."""
    state = run_state(info)
    total = info.get("inputs_total")
    count = f"{records} of {total} inputs have records" if total is not None else f"{records} inputs have records"
    proc = info.get("process") or {}
    if state == "interrupted":
        return (f"{path}: interrupted (run.json says running, but process {proc.get('pid')} on "
                f"{proc.get('host')} is gone); {count} — `cfx explain ... --resume` continues it")
    if state in ("running", "running_elsewhere"):
        where = f"process {proc.get('pid')} on {proc.get('host')}" if proc else "a process cfx cannot identify"
        unsure = "" if state == "running" else ", or interrupted there"
        return f"{path}: still running ({where}{unsure}); {count} so far"
    return None


def read_run_json(path: str | Path) -> dict:
    """RUN_DIR/run.json as a dict; {} when absent or unreadable (callers that need it say so themselves)."""
    try:
        data = json.loads((Path(path) / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resume_line(old_info: dict, done: int, total: int) -> str:
    """What ``--resume`` says before it starts: how much is done and, for a killed run, that it was."""
    line = f"resuming: {done} of {total} inputs done, {total - done} to go"
    if run_state(old_info) == "interrupted":
        proc = old_info.get("process") or {}
        line += f" (the run was interrupted: process {proc.get('pid')} on {proc.get('host')} is gone)"
    return line


def read_manifest(path: Path) -> list[dict]:
    """Complete records only; a torn last line (crash mid-write) is ignored."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write at the very end
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn line followed by later appends; its input is redone on resume
    return records


class RunDir:
    """A run directory being written by ``cfx explain``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest_path = self.path / MANIFEST

    def check(self, *, resume: bool, overwrite: bool) -> bool:
        """Usage errors for the directory's state, without changing anything; True if it is non-empty."""
        if resume and overwrite:
            raise UsageError("--resume and --overwrite cannot be used together")
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path}: exists and is not a directory")
        nonempty = self.path.exists() and any(self.path.iterdir())
        if nonempty and not (resume or overwrite):
            raise UsageError(
                f"run directory {self.path} already exists and is not empty; "
                "pass --resume to continue it or --overwrite to replace it"
            )
        if nonempty and run_state(read_run_json(self.path)) == "running":  # two writers would mix their records
            pid = (read_run_json(self.path).get("process") or {}).get("pid")
            raise UsageError(f"{'--resume' if resume else '--overwrite'}: {self.path} is still being written by "
                             f"process {pid} on this host; wait for it to finish or stop it first")
        if nonempty and overwrite and not (self.path / RUN_JSON).exists() and not self.manifest_path.exists():
            raise UsageError(
                f"--overwrite: {self.path} does not look like a cfx run directory "
                "(no run.json or manifest.jsonl); refusing to delete it"
            )
        return nonempty

    def prepare(self, *, resume: bool, overwrite: bool) -> dict[str, dict]:
        """Create or reopen the directory; returns finished records by id (empty unless resuming)."""
        nonempty = self.check(resume=resume, overwrite=overwrite)
        if nonempty and overwrite:
            self._clear()
        self.path.mkdir(parents=True, exist_ok=True)
        for d in IMAGE_DIRS:
            (self.path / d).mkdir(exist_ok=True)
        done: dict[str, dict] = {}
        if resume:
            for rec in read_manifest(self.manifest_path):
                if rec.get("status") != "error":
                    done[rec["id"]] = rec  # last complete record wins
            self._rewrite_manifest(done.values())
        for tmp in self.path.rglob(".tmp-*"):  # leftovers of an interrupted write
            try:
                tmp.unlink()
            except OSError:
                pass
        return done

    def _clear(self) -> None:
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _rewrite_manifest(self, records: Iterable[dict]) -> None:
        with atomic_write(self.manifest_path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def append(self, record: Record | dict) -> None:
        data = record.to_dict() if isinstance(record, Record) else record
        line = (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides
        try:
            written = os.write(fd, line)
            if written != len(line):  # practically never for regular files; keep the line whole
                os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)

    def image_path(self, folder: str, ident: str) -> Path:
        return safe_child(self.path, folder, f"{ident}.png")

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.path.resolve()).as_posix()

    def write_run_json(self, data: dict) -> None:
        write_json_atomic(self.path / RUN_JSON, data)


@dataclass
class RunData:
    """A finished (or partial) run, read-only: what ``cfx eval`` and metrics see."""

    path: Path  # the run directory
    info: dict  # run.json (method, parameters, classifier, ...); {} when absent
    records: list[dict]  # the manifest: one dict per input with the fields of RECORD_FIELDS
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> RunData:
        p = Path(path)
        if not p.is_dir():
            raise UsageError(f"run directory {p}: no such directory")
        if not (p / MANIFEST).exists():
            raise UsageError(f"{p}: not a cfx run directory (no {MANIFEST})")
        info: dict = {}
        if (p / RUN_JSON).exists():
            try:
                info = json.loads((p / RUN_JSON).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise UsageError(f"{p / RUN_JSON}: unreadable ({exc})") from None
        return cls(p, info, read_manifest(p / MANIFEST))

    @property
    def name(self) -> str:
        return self.path.name

    def explained(self, required: bool = False) -> list[dict]:
        """The manifest records (dicts) that have a counterfactual: status ``flipped`` or ``not_flipped``.
        ``required``: raise :class:`~cfx_cli.errors.MetricUnavailable` when there are none (what a metric wants)."""
        recs = [r for r in self.records if r.get("status") in ("flipped", "not_flipped")]
        if required and not recs:
            raise MetricUnavailable("no explained inputs in the run")
        return recs

    def image(self, relpath: str) -> np.ndarray:
        """The image at a record's path (``rec["counterfactual"]``, ``rec["original"]``, ``rec["mask"]``), decoded
        once and cached: a numpy float32 array (H, W, 3) in [0, 1]; masks (H, W, 1)."""
        if relpath not in self._cache:
            self._cache[relpath] = load_png(safe_child(self.path, relpath))
        return self._cache[relpath]
