"""Placeholder module for the hessian family (being built); exports nothing yet."""

__all__: list[str] = []
