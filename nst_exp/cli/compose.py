"""Re-exports ``nst_exp.compose`` (composition moved below the CLI so that ``api`` need not import ``cli``)."""

from nst_exp.compose import KEYS_HINT, compose_config, first_line

__all__ = ["KEYS_HINT", "compose_config", "first_line"]
