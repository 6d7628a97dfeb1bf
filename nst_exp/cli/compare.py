"""``python -m nst_exp compare DIR...``: contact sheet and summary tables for any finished runs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m nst_exp compare", description="Summarise finished runs or sweeps side by side.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run folders and/or sweep folders")
    parser.add_argument(
        "--out", type=Path, help="where to write (default: the sweep folder if one nst_exp made is given, else outputs/compare/<time>)"
    )
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    from nst_exp.files import WriteFailed
    from nst_exp.run.folder import RESULT_FILE
    from nst_exp.sweep.resume import made_by_a_sweep
    from nst_exp.sweep.summary import best_job, collect_jobs, differences_lines, foreign_files, summarize

    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"error: not a folder: {missing[0]}; fix: pass run or sweep folders (they hold result.json files)", file=sys.stderr)
        return 2
    jobs = collect_jobs(args.dirs)
    if not jobs:
        print(
            f"error: no finished runs (result.json) under {' '.join(map(str, args.dirs))}; fix: point at outputs/runs/... or outputs/multirun/...",
            file=sys.stderr,
        )
        return 2
    # a sweep's own folder (Hydra's multirun.yaml) holds its summary; any other folder is the user's: not written
    single_sweep = len(args.dirs) == 1 and made_by_a_sweep(args.dirs[0]) and not (args.dirs[0] / RESULT_FILE).is_file()
    out = args.out or (args.dirs[0] if single_sweep else Path("outputs/compare") / time.strftime("%Y-%m-%d/%H-%M-%S"))
    foreign = foreign_files(out)
    if foreign:
        print(
            f"error: {out} holds files that nst_exp did not write ({', '.join(foreign)}), which the summary would overwrite; "
            "fix: --out <another folder> (or a new one)",
            file=sys.stderr,
        )
        return 2
    try:
        paths = summarize(jobs, out, title=args.title or f"{len(jobs)} runs")
    except WriteFailed as exc:
        exc.fix = f"{exc.room()}, then run this command again (or --out <another folder>)"
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"runs:          {len(jobs)} ({sum(j.status == 'failed' for j in jobs)} failed)")
    print(f"contact sheet: {paths['contact_sheet']}")
    print(f"summary:       {paths['csv']}  {paths['md']}")
    best = best_job(jobs)
    if best is not None:
        print(f"best:          {best.path} (result/objective {best.metrics['result/objective']:.4g})")
    differs = differences_lines(jobs)
    if differs:
        print("differs:")
        print("\n".join("  " + line.removeprefix("- ").replace("`", "") for line in differs))
    return 0
