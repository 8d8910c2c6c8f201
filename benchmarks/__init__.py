"""Benchmarks: `make bench` (CPU or GPU) and the one-shot GPU check (`bash benchmarks/gpu_check.sh`).

    python -m benchmarks.run [--quick] [--only op|step|paper] [--out DIR]

Modules: methods (every contender, one registry), harness (interleaved timing, memory by saved-tensor hooks, RSS,
CUDA peak), rss_probe (one method in a fresh process), op_bench / step_bench / paper_table (the three parts of
`make bench`), machine (environment and the CPU's measured matmul peak), report (table, JSON, PNG), run (the CLI);
the GPU check's gpu_check (methods against competitors, gradient errors), gpu_phases (chunk-size sweep and
per-phase breakdown of our chunk loop), gpu_summary (the goal ratios and the verdict), gpu_report (its settings
and JSON, without torch), grad_reference (the fp32 reference gradients).
"""
