"""One run: setup, the LightningModule, its callbacks and logger, checkpoints, and the run folder it writes."""
