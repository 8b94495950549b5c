"""What every family is built on: op declaration (:mod:`.ops`), dispatch, extension loading, Philox and seeds,
launching, dtypes, validation, modules and DTensor plumbing."""
