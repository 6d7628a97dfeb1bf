"""``python -m nst_exp bench``: seconds per step of this tool against reference loops.

One job per module: ``cli`` (arguments, interleaved rounds, printing), ``variants`` (what each
row runs, one spawned process per measurement), ``stock`` (the plain PyTorch loop every ratio is
taken against), ``clock`` (step timing windows, memory peaks), ``flops`` (analytic conv FLOPs,
datasheet peaks), ``peak`` (the CPU's peak, measured on VGG19's conv shapes), ``table`` (rows, table, legend) and ``ttq`` (time to quality).
"""

from nst_exp.bench.cli import main

__all__ = ["main"]
