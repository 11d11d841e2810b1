"""The run folder: runs/<name>/ with its config, log, metrics and checkpoints, written
atomically, and the checks that keep an existing run from being replaced or resumed wrongly."""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from harness.config import RESUMABLE_CHANGES, method_list
from harness.errors import UserError


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a crash leaves either the previous file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(obj, (str, bytes)):
                f.write(obj.encode() if isinstance(obj, str) else obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj, path):
    save_atomic(json.dumps(obj, indent=2) + "\n", path)


class Run:
    """runs/<name>/: config.json, log.jsonl, metrics.json, results.md, plots, ckpt/<method>/{last,best}.pt
    (with --fsdp: {last,best}/, sharded checkpoint folders).  Only rank 0 writes, but every rank
    writes its shards of a sharded checkpoint."""

    def __init__(self, cfg, task: str, writer: bool):
        self.writer = writer
        self.suffix = "" if cfg.fsdp else ".pt"           # a folder of shards, or one file
        self.methods = method_list(cfg)
        self.path = Path(cfg.resume) if cfg.resume else Path(cfg.out_dir) / (
            cfg.name or f"{task}-{'+'.join(self.methods)}-seed{cfg.seed}")
        self.config = {"task": task, **dataclasses.asdict(cfg)}
        # a flag added after a run started was at its default there: resuming that run is fine
        self.defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        self.done = []                                    # metrics of finished methods
        if cfg.resume:
            self._check_resume()
        elif (self.path / "config.json").exists() and not cfg.overwrite:
            state = "a finished run" if self._finished() else "an unfinished run"
            raise UserError(f"{self.path} already holds {state}; pass --overwrite to replace it, "
                            f"or --resume {self.path} to continue it")

    def _finished(self):
        try:
            return len(json.loads((self.path / "metrics.json").read_text())) == len(self.methods)
        except (OSError, ValueError):
            return False

    def _check_resume(self):
        if not (self.path / "config.json").exists():
            raise UserError(f"--resume {self.path}: no run there (no config.json); check the folder name")
        saved = json.loads((self.path / "config.json").read_text())
        diff = [k for k in self.config if k not in RESUMABLE_CHANGES
                and saved.get(k, self.defaults.get(k)) != self.config[k]]
        if diff:
            k = diff[0]
            raise UserError(f"--resume {self.path}: the checkpoint was made with {k}={saved.get(k)!r}, "
                            f"not {self.config[k]!r}; repeat the original flags")
        if (self.path / "metrics.json").exists():
            self.done = json.loads((self.path / "metrics.json").read_text())
        if not self.done and not list(self.path.glob(f"ckpt/*/last{self.suffix}")):
            raise UserError(f"--resume {self.path}: no checkpoint there yet; start it again with --overwrite")

    def start(self):
        if not self.writer:
            return
        if not self.config["resume"] and self.path.exists():
            shutil.rmtree(self.path)                      # --overwrite was given
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config, self.path / "config.json")

    def ckpt(self, method, kind="last"):
        return self.path / "ckpt" / method / f"{kind}{self.suffix}"

    def log(self, record):
        if self.writer:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_log(self, method, step):
        """On resume, drop what was logged after the checkpoint: it will be logged again."""
        if not self.writer or not (self.path / "log.jsonl").exists():
            return
        finished = {m["method"] for m in self.done}
        lines = (self.path / "log.jsonl").read_text().splitlines()
        keep = [l for l in lines if (r := json.loads(l))["method"] in finished
                or (r["method"] == method and r["step"] <= step)]
        save_atomic("".join(l + "\n" for l in keep), self.path / "log.jsonl")

    def records(self):
        path = self.path / "log.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
