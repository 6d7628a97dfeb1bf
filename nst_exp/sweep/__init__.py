"""Sweeps: job folder names, the Hydra callback, and summaries read from finished run folders."""
