"""
A job's output path: the in-memory log with absolute offsets and per-follower cursors
(L{jobworker.output.log}) and its on-disk spool (L{jobworker.output.spool}).
"""
