"""The compile gate's own guard rails, cheaply. The full gate (`python -m nitp_kernels.compile_check`, run by
`make test` without TRITON_INTERPRET) compiles every kernel config for sm_90 and sm_80; here nothing is compiled:
`measure` is replaced by fabricated resource figures, so these tests check the gate's verdicts (a spill, shared
memory over the limit, too many iterations at V = 152064 each fail it) and that its spec list matches the
launchers' config sets."""
from __future__ import annotations

import pytest

from nitp_kernels import compile_check
from nitp_kernels.kernels import cross_entropy, nitp_rows, swiglu

CLEAN = {"reg": 40, "stack": 0, "local": 0, "shared": 1024}


def test_gate_refuses_to_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET"):
        compile_check.main([])


def test_every_spec_names_real_kernel_arguments_in_order():
    specs = compile_check.all_specs()
    assert len({spec.label for spec in specs}) == len(specs), "labels must be unique"
    # CE: 3 configs x 3 dtypes; SwiGLU: forward x 3, backward x 5 (d_g, gate_up) dtype pairs;
    # NITP: 5 (pred, target) dtype pairs (loss_type is a runtime argument)
    assert len(specs) == 3 * 3 + (3 + 5) + 5
    for spec in specs:
        assert list(spec.signature) == list(spec.kernel.arg_names), spec.label
        assert set(spec.aligned) <= set(spec.signature), spec.label
        assert all(spec.signature[name] == "constexpr" for name in spec.constexprs), spec.label
    assert {s.kernel for s in specs} == {cross_entropy._ce_rows_kernel, swiglu._swiglu_fwd_kernel,
                                          swiglu._swiglu_bwd_kernel, nitp_rows._nitp_rows_kernel}
    assert {s.block_v for s in specs if s.kernel is cross_entropy._ce_rows_kernel} == \
        {block for _, block, _, _ in cross_entropy.CE_CONFIGS}


def run_gate(monkeypatch, capsys, usage_of, argv=("--arch", "90", "--no-liger")) -> tuple[int, str]:
    """main() with every compile replaced by usage_of(spec, arch): (exit code, printed text)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(compile_check, "measure", lambda spec, arch, tool, workdir: {
        **usage_of(spec, arch), "spill": usage_of(spec, arch)["stack"] + usage_of(spec, arch)["local"]})
    code = compile_check.main(list(argv))
    return code, capsys.readouterr().out


def test_gate_passes_clean_figures_and_reports_iterations(monkeypatch, capsys):
    code, out = run_gate(monkeypatch, capsys, lambda spec, arch: CLEAN)
    assert code == 0, out
    assert "5 iterations a pass at V=152064 (the config chosen there)" in out
    assert "spills: 0" in out and "FAIL" not in out


@pytest.mark.parametrize("figures,message", [
    ({"stack": 48}, "spills 48 B"),            # ptxas spills into the stack frame: what cuobjdump LOCAL misses
    ({"local": 16}, "spills 16 B"),
    ({"shared": 300000}, "shared memory 300000 B > 232448 B"),
])
def test_gate_fails_on_a_spill_or_too_much_shared_memory(monkeypatch, capsys, figures, message):
    bad = compile_check.all_specs()[4].label
    code, out = run_gate(monkeypatch, capsys,
                         lambda spec, arch: {**CLEAN, **figures} if spec.label == bad else CLEAN)
    assert code == 1
    assert f"FAIL sm_90 {bad}" in out and message in out


def test_gate_fails_when_the_large_vocabulary_config_needs_more_than_8_iterations(monkeypatch, capsys):
    monkeypatch.setattr(cross_entropy, "CE_CONFIGS", ((8192, 2048, 8, 1), (None, 16384, 16, 1)))
    code, out = run_gate(monkeypatch, capsys, lambda spec, arch: CLEAN)
    assert code == 1
    assert "10 iterations a pass at V=152064 > 8" in out


def test_liger_figures_are_information_and_never_fail_the_gate(monkeypatch, capsys):
    """With liger-kernel importable its CE kernel is reported, even with figures that would fail ours."""
    pytest.importorskip("liger_kernel", reason="the comparison needs liger-kernel (it is in the dev venv)")

    def usage_of(spec, arch):
        return {**CLEAN, "stack": 64} if spec.label.startswith("liger") else CLEAN

    code, out = run_gate(monkeypatch, capsys, usage_of, argv=("--arch", "90"))
    assert code == 0, out
    assert "info sm_90 liger_cross_entropy[bf16,BLOCK_SIZE=32768,warps=32]" in out
    assert "5 iterations a pass at V=152064" in out.split("liger-kernel")[-1]
