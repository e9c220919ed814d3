"""Plain-torch implementations: the oracle for every fast path and the CPU backend."""
