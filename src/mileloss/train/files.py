"""Kept for ``mileloss.train.config.save_config``: the atomic write lives in :mod:`mileloss.run_folder`."""

from mileloss.run_folder import write_atomic as write_text_atomic  # noqa: F401
