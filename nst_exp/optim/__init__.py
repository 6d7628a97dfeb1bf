"""Optimisers over the one image tensor: the config-chosen factory and the sync-free L-BFGS."""
