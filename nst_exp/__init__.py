"""nst_exp: config-driven neural style transfer experiments (Gatys et al.) on Hydra + Lightning."""

from nst_exp.api import stylize

__all__ = ["stylize"]
__version__ = "0.1.0"
