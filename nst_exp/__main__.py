"""``python -m nst_exp <command> [overrides...]``: run | compare | evaluate | bench."""

from __future__ import annotations

import sys

USAGE = """usage: python -m nst_exp <command> [args]

commands:
  run [key=value ...]       one style transfer (add -m for a sweep); `run --help` lists the config groups
  compare DIR [DIR ...]     contact sheet + summary.csv/md for finished runs or sweeps
  evaluate IMAGE --content C --style S [--style S2]   score any image with the fixed evaluator
  bench [--sizes 256 512] [--steps N] [--device cpu|cuda] [--precision 32|bf16]   speed vs a stock PyTorch loop, a bare loop and pastiche
  bench --quality [--size 256] [--presets default quality]   image quality vs a stock Gatys loop and pastiche (docs/quality.md)

examples:
  python -m nst_exp run style=starry_night
  python -m nst_exp run content.path=/my/photo.jpg style.path=/my/painting.png image.size=512
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "run":
        from nst_exp.cli.checks import check_overrides_compose, check_run_overrides
        from nst_exp.errors import UserError
        from nst_exp.sweep.resume import sweep_command

        try:
            rest = sweep_command(rest)  # resume=<sweep folder>: that sweep's own command, into its folder
            check_run_overrides(rest)
            check_overrides_compose(rest)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from nst_exp.cli.run import main as run_main

        return run_main(rest)
    if command == "evaluate":
        from nst_exp.cli.evaluate import main as evaluate_main

        return evaluate_main(rest)
    if command == "compare":
        from nst_exp.cli.compare import main as compare_main

        return compare_main(rest)
    if command == "bench":
        from nst_exp.bench import main as bench_main

        return bench_main(rest)
    print(
        f"error: unknown command {command!r}; fix: use one of run, compare, evaluate, bench (see python -m nst_exp --help)", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
