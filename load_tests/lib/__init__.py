"""The plumbing the load_tests scripts share.

- ``server``: servers as subprocesses (ports, command lines, start / wait ready / stop, the work
  directory a bench runs in, gRPC model statistics);
- ``load``: loadgen in subprocesses, open-loop send schedules;
- ``report``: machine info, medians, ratios, table cells, result files;
- ``procs``: /proc readers (process trees, RSS, CPU seconds).
"""
