"""Print-size images: the loss and its image gradient, exact, tile by tile.

``geometry`` (tiles, crops with their halo, owned windows), ``targets`` (target features tile by
tile), ``exact`` (the two-pass loss and gradient, and the loss passes a run steps with), ``memory``
(free memory and what the optimiser's state takes), ``plan`` (whether and how a stage tiles) and
``group`` (processes sharing the tiles). Everything here takes plain arguments, never the config.
"""
