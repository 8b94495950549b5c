"""Pure-PyTorch references: the CPU path, the test oracle and the benchmark baseline of every op."""
