"""Re-exports ``nst_exp.compose`` (composition moved below the CLI so that ``api`` need not import ``cli``)."""

from nst_exp.compose import KEYS_HINT, compose_config, first_line, quote_letters_beyond_ascii, quoting_fix

__all__ = ["KEYS_HINT", "compose_config", "first_line", "quote_letters_beyond_ascii", "quoting_fix"]
