"""
The benchmarks' harness: what every benchmark in L{bench.benchmarks} stands
on, and nothing that measures jobworker by itself.

  - L{settings}: paths, units and the sizes and repetitions of a run;
  - L{results}: a row of the summary table, medians, ratios, interleaved
    rounds, the JSON results and printing;
  - L{processes}: the workspace, timed commands (wait4(2) CPU times),
    waiting for a port;
  - L{proc}: measurements read from /proc (CPU time, RSS sampling, PSS);
  - L{cgroups}: a cgroup of its own for each server;
  - L{servers}: a jobworker server of this checkout, the development PKI,
    the OpenSSH reference, and the L{Context} a benchmark gets.

Standard library only, like the driver (C{bench/run.py}).
"""
