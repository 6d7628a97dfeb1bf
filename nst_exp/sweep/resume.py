"""``resume=<sweep folder>``: run a sweep's own command again, into its own folder.

Hydra writes ``multirun.yaml`` into the sweep folder before the first job starts; its
``hydra.overrides`` are the command's overrides. Run again with ``-m`` and ``hydra.sweep.dir`` set to
that folder, every job gets the folder it had (``sweep/naming.py``): a job whose result stands
(``run.folder.FINAL_RESULTS``) is kept, an interrupted one continues from its ``last.ckpt``, a failed,
cancelled or never started one runs (again). ``resume=<run folder>`` stays what it was: one run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from nst_exp.errors import UserError

SWEEP_RECORD = "multirun.yaml"
# Recorded Hydra overrides that the resumed command sets itself.
_SET_HERE = ("hydra.mode=", "hydra.sweep.dir=")


def made_by_a_sweep(folder: Path) -> bool:
    """``folder`` holds the ``multirun.yaml`` Hydra writes for an nst_exp sweep (its config and overrides)."""
    try:
        record = yaml.safe_load((folder / SWEEP_RECORD).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(record, dict) and isinstance(record.get("hydra"), dict) and "loss" in record and "content" in record


def sweep_folder(argv: list[str]) -> Path | None:
    """The sweep folder a ``resume=`` override names, or None (no resume=, or a run folder)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not values or values[-1] in ("", "null"):
        return None
    path = Path(values[-1]).expanduser()
    return path if (path / SWEEP_RECORD).is_file() else None


def sweep_command(argv: list[str]) -> list[str]:
    """``argv`` with ``resume=<sweep folder>`` replaced by that sweep's command: its overrides, ``-m`` and
    ``hydra.sweep.dir=<the folder>``. Other overrides may only be Hydra's (``hydra.launcher.n_jobs=1``):
    a changed setting would change the jobs and their folders. Runs in the folder the sweep started from,
    where its relative paths point. ``argv`` without a sweep folder comes back unchanged."""
    folder = sweep_folder(argv)
    if folder is None:
        return argv
    try:
        record = yaml.safe_load((folder / SWEEP_RECORD).read_text()) or {}
        recorded = record["hydra"]["overrides"]
        task, hydra = list(recorded.get("task") or []), list(recorded.get("hydra") or [])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise UserError(
            f"resume={folder}: cannot read its {SWEEP_RECORD} ({type(exc).__name__}); fix: point resume= at "
            "a sweep folder nst_exp made (it holds multirun.yaml), or re-run the sweep's command"
        ) from None
    extra = [a for a in argv if not a.startswith("resume=") and a not in ("-m", "--multirun")]
    changed = [a for a in extra if not a.startswith(("hydra.", "+hydra.", "~hydra."))]
    if changed:
        raise UserError(
            f"resume={folder} runs that sweep's own overrides again, and {changed[0]} would change its jobs; "
            f"fix: drop {changed[0]} (only hydra.* settings, e.g. hydra.launcher.n_jobs=1, may change), "
            "or start a new sweep"
        )
    running = live_jobs(folder)
    if running:
        raise UserError(
            f"resume={folder}: jobs of this sweep still run ({', '.join(running[:5])}), and would share their "
            "folders with the resumed ones; fix: wait for them to end, or stop them (scancel <id> on SLURM, "
            "kill <pid> for submitit_local), then resume"
        )
    cwd = (record.get("hydra") or {}).get("runtime", {}).get("cwd")
    target = str(folder.resolve())
    if cwd and Path(cwd).is_dir() and Path(cwd).resolve() != Path.cwd().resolve():
        os.chdir(cwd)  # the sweep's relative paths (content.path=photos/a.jpg) are relative to where it started
        print(f"resume:      in {cwd}, where the sweep started")
    kept = [o for o in hydra if not o.startswith(_SET_HERE)]
    return ["-m", *task, *kept, *extra, f"hydra.sweep.dir={target}"]


def live_jobs(folder: Path) -> list[str]:
    """The submitit jobs of the sweep (``<sweep>/.submitit/<job id>``) that still run: SLURM jobs that
    ``squeue`` lists, or local jobs (the id is the process id) whose process is alive here. A driver
    killed with SIGKILL leaves them running; resuming beside them would run a job twice in one folder."""
    ids = [p.name for p in sorted((folder / ".submitit").glob("*")) if p.is_dir() and p.name[:1].isdigit()]
    if not ids:
        return []
    live = []
    for job in ids:
        cmdline = Path(f"/proc/{job}/cmdline")
        try:
            if job.isdigit() and b"submitit" in cmdline.read_bytes():
                live.append(job)
        except OSError:
            pass
    if shutil.which("squeue"):
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        queued = {line.strip().split("_")[0] for line in out.splitlines() if line.strip()}
        live += [job for job in ids if job.split("_")[0] in queued and job not in live]
    return live
