"""The run folder: runs/<name>/ with its config, log, metrics and checkpoints, written
atomically by one process at a time, and the checks that keep an existing run from being
replaced or resumed wrongly, and any other folder from being touched at all."""
import dataclasses
import fcntl
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from harness.config import RESUMABLE_CHANGES, method_list
from harness.errors import UserError

_UMASK = os.umask(0o22)
os.umask(_UMASK)                                          # read once: mkstemp makes files 0600, we want the usual mode
LOCK = ".lock"                                            # held by the process that writes the folder (Run.lock)


def save_atomic(obj, path):
    """torch.save (or write text / bytes) to a fresh temporary file in the same folder, fsync, then
    rename over `path`: a crash leaves either the previous file or the new one, never half a file.
    mkstemp creates the temporary file with O_EXCL under a new random name, so a symlink planted
    there is never followed, and two writers never share one; os.replace replaces a symlink at
    `path` itself, not the file it points to."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with open(fd, "wb") as f:
            if isinstance(obj, (str, bytes)):
                f.write(obj.encode() if isinstance(obj, str) else obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)                           # the rename itself survives a power cut
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(obj, path):
    save_atomic(json.dumps(obj, indent=2) + "\n", path)


def is_run(path) -> bool:
    """Whether `path` is a run folder of this project: its config.json is a JSON object with the
    keys every run writes first (a model folder's config.json, say, is not)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"task", "methods", "seed", "out_dir", "resume"} <= set(config)


def read_log(path, warn=True) -> list:
    """The records of a log.jsonl.  A last line cut short (a crash or a full disk mid-append) is
    dropped, with a warning; any other line that is not a JSON record is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            if n == len(lines):
                if warn:
                    print(f"warning: {path}:{n}: the last line is cut short (a crash while writing it); "
                          f"dropping it", file=sys.stderr)
                break
            raise UserError(f"{path}:{n}: not a JSON record; the log was edited or damaged, "
                            f"fix or delete that line") from None
        records.append(record)
    return records


def check_name(name: str):
    """--name is one folder inside --out_dir: not empty, not . or .., with no path separator, so that
    a run can never stand for --out_dir itself, anything above it, or anywhere else."""
    if name in ("", ".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name) \
            or "\0" in name:
        raise UserError(f"--name={name!r} must be one folder name inside --out_dir (no '/', not '.' or '..'); "
                        f"use --out_dir for the parent folder, e.g. --out_dir=runs --name=rte-seed0")


class Run:
    """runs/<name>/: config.json, log.jsonl, metrics.json, results.md, plots, ckpt/<method>/{last,best}.pt
    (with --fsdp: {last,best}/, sharded checkpoint folders) and .lock.  Only rank 0 writes, but every
    rank writes its shards of a sharded checkpoint.

    Only a folder that is a run (is_run) is ever replaced, and only with --overwrite; an empty
    folder may be used; anything else is refused.  The writer holds the lock from before its first
    write (or read, on --resume) until close()."""

    def __init__(self, cfg, task: str, writer: bool):
        self.writer = writer
        self.overwrite = cfg.overwrite
        self.suffix = "" if cfg.fsdp else ".pt"           # a folder of shards, or one file
        self.methods = method_list(cfg)
        if cfg.name and not cfg.resume:
            check_name(cfg.name)
        self.path = Path(cfg.resume) if cfg.resume else Path(cfg.out_dir) / (
            cfg.name or f"{task}-{'+'.join(self.methods)}-seed{cfg.seed}")
        self.config = {"task": task, **dataclasses.asdict(cfg)}
        # a flag added after a run started was at its default there: resuming that run is fine
        self.defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        self.done = []                                    # metrics of finished methods
        self._lock = None
        if cfg.resume:
            if writer and is_run(self.path):
                self.lock()                               # before reading: no other process writes it meanwhile
            try:
                self._check_resume()
            except BaseException:
                self.close()
                raise
        else:
            self._check_new()

    # --- checks -----------------------------------------------------------------------------

    def _check_new(self):
        path = self.path
        if path.exists() or path.is_symlink():
            if not path.is_dir() or path.is_symlink():
                raise UserError(f"{path} exists and is not a folder; pick another --name or --out_dir")
            if is_run(path):
                if not self.overwrite:
                    state = "a finished run" if self._finished() else "an unfinished run"
                    raise UserError(f"{path} already holds {state}; pass --overwrite to replace it, "
                                    f"or --resume {path} to continue it")
            elif set(os.listdir(path)) - {LOCK}:
                raise UserError(f"{path} exists and is not a run folder (no run's config.json); it is left "
                                f"untouched: pick another --name or --out_dir, or empty that folder yourself")
        parent = next(p for p in (path, *path.parents) if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot write the run folder {path}: {parent} is not a writable folder; "
                            f"pass a writable --out_dir")

    def _finished(self):
        try:
            return len(json.loads((self.path / "metrics.json").read_text())) == len(self.methods)
        except (OSError, ValueError, TypeError):
            return False

    def _check_resume(self):
        if not is_run(self.path):
            raise UserError(f"--resume {self.path}: no run there (no run's config.json); check the folder name")
        saved = json.loads((self.path / "config.json").read_text())
        diff = [k for k in self.config if k not in RESUMABLE_CHANGES
                and saved.get(k, self.defaults.get(k)) != self.config[k]]
        if diff:
            k = diff[0]
            raise UserError(f"--resume {self.path}: the checkpoint was made with {k}={saved.get(k)!r}, "
                            f"not {self.config[k]!r}; repeat the original flags")
        if (self.path / "metrics.json").exists():
            try:
                self.done = json.loads((self.path / "metrics.json").read_text())
            except ValueError:
                raise UserError(f"{self.path / 'metrics.json'}: not JSON; the file was edited or damaged") from None
        if not self.done and not any(any(self.path.glob(f"ckpt/*/{kind}{self.suffix}")) for kind in ("last", "best")):
            raise UserError(f"--resume {self.path}: no checkpoint there yet; start it again with --overwrite")

    # --- the lock -----------------------------------------------------------------------------

    def lock(self):
        """Hold an exclusive fcntl.flock on <run>/.lock until close() or the process ends.
        flock rather than an O_EXCL pid file: the kernel drops it when its holder dies, even by
        SIGKILL, so a crash never leaves a stale lock to clear by hand, and no pid is reused.
        (flock holds on local disks; on NFS Linux maps it to a POSIX record lock.)"""
        if self._lock is not None:
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{self.path} is in use by another process (pid {holder}, which holds "
                            f"{self.path / LOCK}); wait for it to finish or stop it, then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def close(self):
        if self._lock is not None:
            os.close(self._lock)                          # releases the flock
            self._lock = None

    # --- writing ------------------------------------------------------------------------------

    def start(self):
        if not self.writer:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
            if not self.config["resume"]:
                self._clear()
                write_json(self.config, self.path / "config.json")   # first: from here on the folder is a run
        except OSError as e:
            raise UserError(f"cannot write the run folder {self.path}: {e.strerror or e} "
                            f"({e.filename or self.path}); pass a writable --out_dir") from None

    def _clear(self):
        """Under the lock, check again what _check_new checked (another process may have got there
        first), and with --overwrite empty the folder, which is a run."""
        entries = set(os.listdir(self.path)) - {LOCK}
        if not entries:
            return
        if not is_run(self.path):
            raise UserError(f"{self.path} exists and is not a run folder (no run's config.json); it is left "
                            f"untouched: pick another --name or --out_dir")
        if not self.overwrite:
            raise UserError(f"{self.path} already holds a run (another process started it); pass --overwrite "
                            f"to replace it, or --resume {self.path} to continue it")
        (self.path / "config.json").unlink()              # first: a crash mid-way leaves no half run that passes is_run
        for name in entries - {"config.json"}:
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def ckpt(self, method, kind="last"):
        return self.path / "ckpt" / method / f"{kind}{self.suffix}"

    def log(self, record):
        if self.writer:
            line = (json.dumps(record) + "\n").encode()
            fd = os.open(self.path / "log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                         0o666 & ~_UMASK)
            try:
                os.write(fd, line)                        # one write: a crash cuts at most this last line
            finally:
                os.close(fd)

    def truncate_log(self, method, step):
        """On resume, drop what was logged after the checkpoint: it will be logged again.  A last
        line cut short by a crash goes too (read_log warns)."""
        if not self.writer or not (self.path / "log.jsonl").exists():
            return
        finished = {m["method"] for m in self.done}
        keep = [r for r in read_log(self.path / "log.jsonl") if r.get("method") in finished
                or (r.get("method") == method and r.get("step", 0) <= step)]
        save_atomic("".join(json.dumps(r) + "\n" for r in keep), self.path / "log.jsonl")

    def records(self):
        return read_log(self.path / "log.jsonl", warn=False)
