"""`make bench`: what NITP costs over NTP, in time and memory, beside the alternatives a user could pick.

    python -m benchmarks.run [--quick] [--only op|step|paper] [--out DIR]

Modules: methods (the op-level contenders a-g), harness (interleaved timing, memory by saved-tensor hooks, RSS,
CUDA peak), rss_probe (one method in a fresh process), op_bench / step_bench / paper_table (the three parts of
the report), machine (environment and the CPU's measured matmul peak), report (table, JSON, PNG), run (the CLI).
gpu_op_bench.py and gpu_check.sh are the separate GPU-machine op check (issue 3) and are not used here.
"""
