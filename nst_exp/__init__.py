"""nst_exp: config-driven neural style transfer experiments (Gatys et al.) on Hydra + Lightning."""

from nst_exp._version import __version__
from nst_exp.api import stylize

__all__ = ["__version__", "stylize"]
