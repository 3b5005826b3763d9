"""What tests and benchmarks share: the real app run as a server process, and pictures with known text."""
