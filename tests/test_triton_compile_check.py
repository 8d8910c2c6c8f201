"""The compile gate's own guard rails, cheaply: the full gate (`python -m nitp_kernels.compile_check`, run by
`make test` without TRITON_INTERPRET) compiles every kernel config for sm_90 and sm_80; here we only check
that it refuses to run under the interpreter and that its spec list matches the launchers' config sets."""
from __future__ import annotations

import pytest

from nitp_kernels import compile_check
from nitp_kernels.kernels import cross_entropy, nitp_rows, swiglu


def test_gate_refuses_to_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET"):
        compile_check.main([])


def test_every_spec_names_real_kernel_arguments_in_order():
    specs = compile_check.all_specs()
    assert len({spec.label for spec in specs}) == len(specs), "labels must be unique"
    # CE: 2 configs x 3 dtypes; SwiGLU: forward x 3, backward x 5 (d_g, gate_up) dtype pairs;
    # NITP: 5 (pred, target) dtype pairs (loss_type is a runtime argument)
    assert len(specs) == 2 * 3 + (3 + 5) + 5
    for spec in specs:
        assert list(spec.signature) == list(spec.kernel.arg_names), spec.label
        assert set(spec.aligned) <= set(spec.signature), spec.label
        assert all(spec.signature[name] == "constexpr" for name in spec.constexprs), spec.label
    assert {s.kernel for s in specs} == {cross_entropy._ce_rows_kernel, swiglu._swiglu_fwd_kernel,
                                          swiglu._swiglu_bwd_kernel, nitp_rows._nitp_rows_kernel}
