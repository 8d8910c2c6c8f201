"""Hand-written Triton kernels of the "triton" backend, one family per module.

Each module holds its @triton.jit kernels, the launcher that picks a config from a small fixed set, and
`compile_specs()`, the list of every (kernel, signature, config) its launcher can choose, which
nitp_kernels.compile_check compiles ahead of time for sm_90 and sm_80.
"""
