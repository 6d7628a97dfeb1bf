"""``python -m nst_exp bench``: seconds per step of this tool against reference loops (see ``cli``)."""

from nst_exp.bench.variants import *  # noqa: F401,F403 - the module moved here whole; split next
from nst_exp.bench.variants import main  # noqa: F401
