"""Placeholder module for the grad_norms family (being built); exports nothing yet."""

__all__: list[str] = []
