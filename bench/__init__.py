"""`make bench`: throughput of the pipeline's stages against bare TRL scripts (see run.py)."""
