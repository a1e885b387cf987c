"""Shared helpers of the stage scripts: datasets, ZCA, DSA, synthetic-set I/O, training, logging."""
