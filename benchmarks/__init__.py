"""tsfn's benchmarks: tsfn against every peer, in one run, with ratios.

Run ``python3 dev.py bench`` (or ``python -m benchmarks`` with the ``bench`` dependency group
installed); ``--help`` lists the options. The modules, one per concern:

- `_peers`: the bridges, i.e. tsfn and each peer used the way its users would;
- `_cases`: what one run does (producers on a barrier, a sum checked at the end);
- `_memory`: peak RSS of one case, in a fresh child process;
- `_node`: Node's own threadsafe function, through a small C addon in `node_addon/`;
- `_report`: the tables and the targets (benchmarks/results.md, which the docs include);
- `_suite`: the case list, interleaved rounds, the command line.
"""
