"""Placeholder module for the mix family (being built); exports nothing yet."""

__all__: list[str] = []
