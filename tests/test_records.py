"""Nothing lost, nothing rewritten: refused runs, damaged checkpoints and full disks, on real files.

A refused run (any reason) leaves every byte as it was and creates nothing; a write that fails
(a full or read-only filesystem, a real tmpfs here) is one line naming the file and the fix, keeps
the previous version of every file whole, leaves no temporary file, and the run continues once
there is room.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_line_error, run_cli
from PIL import Image

FAST = ["image.size=32", "trainer.max_steps=3", "logging.progress_bar=false", "logging.flush_every=1"]


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (folders too) with its bytes' digest: what "as it was" means here."""
    if not root.exists():
        return {}
    out = {".": "dir"}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = "dir" if path.is_dir() else hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The CLI with its temporary files in ``cwd/tmp``: a test sees that Hydra's staging folder is gone."""
    (cwd / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(cwd / "tmp"), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "nst_exp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def staging_left(cwd: Path) -> list[Path]:
    from nst_exp.cli.run import STAGING_PREFIX

    return list((cwd / "tmp").glob(f"{STAGING_PREFIX}*"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("finished")
    proc = cli(["run", *FAST, f"hydra.run.dir={cwd / 'run'}"], cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "run"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("sweep")
    proc = cli(["run", "-m", *FAST, "trainer.max_steps=2", "loss.style_weight=5,50", f"hydra.sweep.dir={cwd / 'sweep'}"], cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "sweep"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run stopped by Ctrl-C at step 3: last.ckpt, final.png and result.json "interrupted" (in-process, real)."""
    import pytorch_lightning as pl

    from nst_exp.api import compose_config
    from nst_exp.run import runner

    class CtrlC(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step >= 3:
                raise KeyboardInterrupt

    run = tmp_path_factory.mktemp("interrupted") / "run"
    cfg = compose_config([*FAST, "image.size=128", "trainer.max_steps=50", "trainer.accelerator=cpu"])  # resumed at 128 px below
    result = runner.run(cfg, run, extra_callbacks=(CtrlC(),))
    assert result.status == "interrupted" and (run / "last.ckpt").is_file()
    return run


def _copy(run: Path, where: Path) -> Path:
    dest = where / run.name
    shutil.copytree(run, dest)
    return dest


# --- a refused run writes nothing -------------------------------------------------------------


def test_resume_at_a_folder_of_photos_leaves_it_as_it_was(tmp_path, photo):
    photos = photo.parent / "photos"
    photos.mkdir()
    shutil.copy(photo, photos / "cat.png")
    before = tree(photos)
    one_line_error(cli(["run", f"resume={photos}"], tmp_path), "not a run folder made by nst_exp", "fix:")
    assert tree(photos) == before
    assert not (tmp_path / "outputs").exists() and not staging_left(tmp_path)


def test_resume_after_the_content_file_changed_is_refused_and_goes_on_once_it_is_back(tmp_path, photo, painting):
    """provenance.yaml keeps each input's pixel fingerprint: a resume whose photo was edited since is one line
    and leaves the run folder as it was; with the photo restored the run goes on."""
    run = tmp_path / "run"
    common = [f"content.path={photo}", "image.size=32", "logging.progress_bar=false", "trainer.checkpoint_every=1"]
    first = cli(["run", *common, "trainer.max_steps=2", f"hydra.run.dir={run}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    original = photo.read_bytes()
    Image.open(painting).convert("RGB").resize((64, 43)).save(photo)  # the same file name, another picture
    before = tree(run)
    one_line_error(cli(["run", f"resume={run}", "trainer.max_steps=3"], tmp_path), "the content image is not the one", "fix:")
    assert tree(run) == before and not staging_left(tmp_path)
    photo.write_bytes(original)
    again = cli(["run", f"resume={run}", "trainer.max_steps=3"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "result.json").read_text())["metrics"]["result/steps"] == 3


def test_resume_at_a_missing_path_creates_nothing(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    one_line_error(cli(["run", f"resume={missing}"], tmp_path), "does not exist", "fix:")
    assert not (tmp_path / "does").exists()


def test_resume_at_a_finished_sweep_folder_keeps_every_job_as_it_was(tmp_path, sweep):
    """``resume=<sweep folder>`` runs that sweep's own command again (docs/reproducibility.md): a sweep
    whose jobs all completed keeps every job's files byte for byte, and compare still counts them all."""
    jobs = sorted(p for p in sweep.iterdir() if (p / "result.json").is_file())
    before = {job.name: tree(job) for job in jobs}
    proc = cli(["run", f"resume={sweep}"], tmp_path)
    assert proc.returncode == 0 and "2 jobs, 2 completed" in proc.stdout, proc.stdout + proc.stderr
    assert {job.name: tree(job) for job in jobs} == before
    proc = run_cli(["compare", str(sweep), "--out", str(tmp_path / "cmp")], tmp_path)
    assert proc.returncode == 0 and "runs:          2 (0 failed)" in proc.stdout, proc.stdout + proc.stderr


def test_resume_at_a_folder_of_job_folders_without_a_sweep_record_is_refused(tmp_path, sweep):
    """A folder holding run folders but no multirun.yaml is no sweep to run again: one line, nothing written."""
    loose = tmp_path / "loose"
    shutil.copytree(sweep, loose)
    (loose / "multirun.yaml").unlink()
    before = tree(loose)
    one_line_error(cli(["run", f"resume={loose}"], tmp_path), "fix: resume one of its jobs", f"resume={loose}/0_")
    assert tree(loose) == before


@pytest.mark.parametrize("how", ["hydra.run.dir", "resume, nothing left to do"])
def test_a_refused_run_in_a_finished_run_rewrites_nothing(tmp_path, finished, how):
    before = tree(finished)
    if how == "hydra.run.dir":  # another image, size and step count aimed at a finished run
        proc = cli(["run", *FAST, "image.size=40", "style=hubble", f"hydra.run.dir={finished}"], tmp_path)
        one_line_error(proc, "already holds a finished run", "fix:")
    else:
        proc = cli(["run", f"resume={finished}"], tmp_path)
        one_line_error(proc, "trainer.max_steps=3 is the total", "fix: trainer.max_steps=103")
    assert tree(finished) == before
    assert not staging_left(tmp_path)  # Hydra's staging folder is gone too


@pytest.mark.parametrize("names", [("config.yaml", "result.json"), ("final.png",), ("snapshots",)])
def test_a_folder_of_a_users_own_files_is_refused_and_left_as_it_was(tmp_path, names):
    """A user's own files under the names a run writes (their config.yaml, a picture called final.png) are
    never written over: the CLI and the API refuse in one line and the folder stays byte for byte as it was.
    Files of other names are no obstacle."""
    import nst_exp
    from nst_exp.errors import UserError

    mine = tmp_path / "mine"
    mine.mkdir()
    for name in names:
        if name == "snapshots":
            (mine / name).mkdir()
            (mine / name / "step_000003.png").write_bytes(b"my own picture")
        else:
            (mine / name).write_text(f"my own {name}\n")
    (mine / "notes.txt").write_text("my notes\n")
    before = tree(mine)
    one_line_error(cli(["run", *FAST, f"hydra.run.dir={mine}"], tmp_path), "holds files that no nst_exp run wrote", names[0], "fix:")
    with pytest.raises(UserError, match=f"holds files that no nst_exp run wrote .*{names[0]}"):
        nst_exp.stylize(output_dir=mine, overrides=FAST)
    assert tree(mine) == before and not staging_left(tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes\n")
    assert cli(["run", *FAST, f"hydra.run.dir={notes}"], tmp_path).returncode == 0
    assert (notes / "final.png").is_file() and (notes / "notes.txt").read_text() == "my notes\n"


def test_a_sweep_or_compare_into_a_folder_of_a_users_own_files_is_refused(tmp_path, finished):
    """A sweep's folder and compare's --out get multirun.yaml and summary.csv/md, contact_sheet.png: a user's
    own files of those names there are never written over. A summary folder nst_exp made is written again."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.csv").write_text("my own table\n")
    (mine / "multirun.yaml").write_text("mine: true\n")
    before = tree(mine)
    sweep = cli(["run", "-m", *FAST, "loss.style_weight=10,20", f"hydra.sweep.dir={mine}"], tmp_path)
    one_line_error(sweep, "holds files that no nst_exp sweep wrote (multirun.yaml, summary.csv)", "fix:")
    compare = cli(["compare", str(finished), "--out", str(mine)], tmp_path)
    one_line_error(compare, "holds files that nst_exp did not write (summary.csv)", "fix: --out")  # it writes no multirun.yaml
    assert tree(mine) == before
    out = tmp_path / "compared"
    for _ in range(2):
        proc = cli(["compare", str(finished), "--out", str(out)], tmp_path)
        assert proc.returncode == 0 and (out / "summary.csv").is_file(), proc.stderr


def test_refusal_found_while_planning_the_first_stage_writes_nothing(tmp_path, interrupted):
    """Some refusals need the loss built (the memory budget fits no tile): they still come before the
    folder is written, for a new folder as for a run being continued."""
    run = _copy(interrupted, tmp_path)
    before = tree(run)
    budget = ["image.size=128", "image.memory_mib=5"]
    one_line_error(cli(["run", f"resume={run}", *budget], tmp_path), "the budget is 5 MiB", "fix:")
    assert tree(run) == before
    new = tmp_path / "new" / "run"
    one_line_error(cli(["run", *FAST, *budget, f"hydra.run.dir={new}"], tmp_path), "the budget is 5 MiB")
    assert not (tmp_path / "new").exists() and not staging_left(tmp_path)


def test_staging_of_a_killed_run_is_removed_by_the_next_one(tmp_path):
    """A run killed outright (SIGKILL) cannot clean up Hydra's staging folder; the next run removes it."""
    from nst_exp.cli.run import STAGING_PREFIX, remove_stale_staging

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{STAGING_PREFIX}{int(gone.stdout)}-abc"
    alive = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-def"
    for path in (stale, alive):
        (path / ".hydra").mkdir(parents=True)
    remove_stale_staging(tmp_path)
    assert not stale.exists() and alive.exists()


def test_accepted_run_has_hydra_s_record_naming_its_own_folder(finished):
    hydra = (finished / ".hydra" / "hydra.yaml").read_text()
    assert f"dir: {finished}" in hydra and f"output_dir: {finished}" in hydra and "nst_exp-hydra" not in hydra
    assert f"hydra.run.dir={finished}" in hydra


def test_api_refusal_creates_no_folder(tmp_path, monkeypatch, finished):
    import nst_exp
    from nst_exp.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="content image not found"):
        nst_exp.stylize(tmp_path / "missing.jpg", image={"size": 32})
    assert not (tmp_path / "outputs").exists()
    before = tree(finished)
    with pytest.raises(UserError, match="already holds a finished run"):
        nst_exp.stylize(output_dir=finished, overrides=FAST)
    assert tree(finished) == before


# --- a damaged or foreign last.ckpt ----------------------------------------------------------


def test_truncated_checkpoint_is_one_line_and_its_fix_is_what_happens(tmp_path, interrupted):
    run = _copy(interrupted, tmp_path)
    ckpt = run / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = tree(run)
    line = one_line_error(
        cli(["run", f"resume={run}", "trainer.max_steps=6"], tmp_path),
        f"cannot read the checkpoint {ckpt}",
        "damaged",
        "continues from its saved final.png (step 3)",
    )
    assert tree(run) == before and json.loads((run / "result.json").read_text())["status"] == "interrupted", line
    ckpt.rename(run / "last.ckpt.bad")  # the fix, as the line says
    proc = cli(["run", f"resume={run}", "trainer.max_steps=6"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["metrics"]["result/steps"] == 6


@pytest.mark.parametrize("content", ["random bytes", "another program's checkpoint", "a tensor"])
def test_damaged_or_foreign_checkpoint_is_refused_with_the_options(tmp_path, interrupted, content):
    from nst_exp.errors import UserError
    from nst_exp.run.checkpoint import load_state

    run = _copy(interrupted, tmp_path)
    ckpt = run / "last.ckpt"
    if content == "random bytes":
        ckpt.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif content == "a tensor":
        torch.save(torch.zeros(3), ckpt)
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, ckpt)
    before = tree(run)
    with pytest.raises(UserError, match="fix: move it away .* continues from its saved final.png .* or start over") as err:
        load_state(ckpt, str(run))
    assert ("damaged" if content == "random bytes" else "not a checkpoint of nst_exp") in str(err.value)
    assert "\n" not in str(err.value) and tree(run) == before


# --- a write that fails -----------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path) -> Path:
    """A real 4 MiB tmpfs (CI runs as root); skipped, with the reason, where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk tests (needs root): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free (as far as the filesystem's blocks allow)."""
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    free = shutil.disk_usage(disk).free - leave
    with filler.open("wb") as fh:
        try:
            fh.write(b"\0" * max(0, free))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def no_temporary_files(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("leave", [0, 48 * 1024], ids=["full", "room for a few steps"])
def test_full_disk_is_one_line_keeps_every_file_whole_and_resumes_once_there_is_room(tmp_path, small_disk, leave):
    """A finished run continued on a disk that fills up: its config, event file, snapshots, checkpoints,
    final image or record fails (whichever first); the previous version of each stays whole."""
    run = small_disk / "run"
    proc = cli(["run", *FAST, f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "final.png", "result.json")}
    filler = fill(small_disk, leave)
    args = [
        "run",
        f"resume={run}",
        "trainer.max_steps=30",
        "trainer.checkpoint_every=2",
        "logging.image_every=1",
        "logging.save_snapshots=true",
        "logging.flush_every=1",
        "logging.progress_bar=false",
    ]
    line = one_line_error(
        cli(args, tmp_path),
        "could not write the ",
        "no space left on the device",
        "fix: free space where it goes (df -h ",
        f"then resume={run} continues the run",
    )
    no_temporary_files(small_disk)
    Image.open(run / "final.png").load()  # whole: the old one, or a complete new one
    result = json.loads((run / "result.json").read_text())
    assert result == json.loads(before["result.json"]) or result["status"] == "failed", line
    if result["status"] == "failed":  # as complete as a finished run's record: what ran, where and how
        assert {"provenance", "labels", "metrics"} <= set(result) and result["provenance"]["resolved"], result
    assert isinstance(yaml.safe_load((run / "config.yaml").read_text()), dict)  # the old one or a complete new one
    filler.unlink()
    proc = cli(args, tmp_path)  # room again: the same command continues the run
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["metrics"]["result/steps"] == 30
    no_temporary_files(small_disk)


def test_event_file_on_a_full_disk_fails_in_one_line_with_no_thread_traceback(small_disk, capfd):
    from torch.utils.tensorboard import SummaryWriter

    from nst_exp.files import WriteFailed
    from nst_exp.run.logger import guard_event_file

    writer = SummaryWriter(str(small_disk / "tb"))
    guard_event_file(writer)
    fill(small_disk, 0)
    with pytest.raises(WriteFailed, match=r"could not write the TensorBoard event file .*events.out.tfevents.*: no space left"):
        for step in range(20000):
            writer.add_scalar("loss/total", 1.0, step)
            if step % 500 == 0:
                writer.flush()
    with pytest.raises(WriteFailed):
        writer.close()
    assert "Traceback" not in capfd.readouterr().err  # the writer thread died quietly


def test_sweep_summary_on_a_full_disk_keeps_the_previous_one(tmp_path, small_disk, sweep, capsys):
    from nst_exp.cli.compare import main as compare

    out = small_disk / "summary"
    assert compare([str(sweep), "--out", str(out)]) == 0
    before = tree(out)
    fill(small_disk, 0)
    assert compare([str(sweep), "--out", str(out), "--title", "again"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not write the ") and "no space left" in err[0], err
    assert "fix: free space" in err[0] and "run this command again" in err[0]
    assert tree(out) == before
    no_temporary_files(small_disk)


def test_read_only_folder_keeps_the_record_and_names_the_problem(small_disk):
    from nst_exp.files import WriteFailed
    from nst_exp.run.folder import read_result, write_result

    run = small_disk / "run"
    run.mkdir()
    write_result(run, "completed", metrics={"result/steps": 3})
    before = tree(run)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(
        WriteFailed, match=r"could not write the run record .*result.json: the filesystem is read-only; fix: make .* writable"
    ):
        write_result(run, "failed", error="x")
    assert tree(run) == before and read_result(run)["status"] == "completed"


def test_records_written_before_the_result_prefix_read_as_today(tmp_path):
    """result.json files from before ``hp/*`` became ``result/*``: compare and resume= still read their metrics."""
    from nst_exp.run.folder import read_result
    from nst_exp.sweep.summary import load_job

    run = tmp_path / "old"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"status": "completed", "metrics": {"hp/steps": 7.0, "hp/objective": 0.5}}))
    assert read_result(run)["metrics"] == {"result/steps": 7.0, "result/objective": 0.5}
    assert load_job(run).metrics["result/objective"] == 0.5
