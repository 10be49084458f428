"""Choosing: profiling, hardware specs, the MIP and its frontiers."""
