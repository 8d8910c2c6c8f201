"""Ahead-of-time compile gate for the Triton kernels, no GPU needed.

    python -m nitp_kernels.compile_check [--arch 90 80] [--quiet] [--no-liger]

Compiles every kernel at every config its launcher can choose (each kernel module's `compile_specs()`) for
sm_90 and sm_80 through triton.compile with an explicit GPUTarget, reads registers, stack frame, shared memory
and local bytes of each cubin with the cuobjdump Triton ships (triton/backends/nvidia/bin/), and prints one line
per kernel and config; for the cross-entropy kernel also the loop iterations of each pass over a row of
V = 152064 logits (the vocabulary of the paper's models). It ends with
`compile_check: K kernels/configs compiled for sm_90, sm_80; spills: S`.

Exits non-zero on a compile error, any spill, shared memory over the chip's limit (the compiler accepts an
over-budget kernel; the launch would fail on the GPU), or a cross-entropy config chosen for V = 152064 that
needs more than 8 iterations a pass. A spill is a stack frame or local memory: these kernels call no functions
and keep no local arrays, so ptxas only creates a stack frame to spill registers into.

For information, when liger-kernel is importable, Liger-Kernel's cross-entropy kernel is compiled the same way
at the config its fused linear cross-entropy launches for V = 152064, and its figures are printed; they never
fail the gate. triton.compile fails under TRITON_INTERPRET, so the variable is refused here rather than
silently unset.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the opt-in shared memory per block of each architecture (bytes)
SHARED_LIMIT = {90: 232448, 80: 166912}
RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# the vocabulary the iteration budget is checked at (Qwen2 / the paper's models), and the budget
REFERENCE_VOCAB = 152064
MAX_ITERATIONS_PER_PASS = 8


def _refuse_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check: TRITON_INTERPRET is set; triton.compile does not work under the "
                         "interpreter. Run it as `env -u TRITON_INTERPRET python -m nitp_kernels.compile_check`.")


def _cuobjdump() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise SystemExit(f"compile_check: cuobjdump not found at {path}")
    return path


def all_specs() -> list:
    """Every CompileSpec of every kernel module."""
    from .kernels import cross_entropy, nitp_rows, swiglu

    return cross_entropy.compile_specs() + swiglu.compile_specs() + nitp_rows.compile_specs()


def resource_usage(cubin: bytes, cuobjdump: Path, workdir: Path) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL bytes of the (single) kernel in a cubin, from cuobjdump."""
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], check=True,
                          capture_output=True, text=True).stdout
    match = RESOURCE_RE.search(text)
    if match is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{text}")
    reg, stack, shared, local = (int(v) for v in match.groups())
    return {"reg": reg, "stack": stack, "shared": shared, "local": local}


def compile_spec(spec, arch: int):
    """triton.compile of one spec for sm_<arch>, as its launcher would run it."""
    import triton
    from triton.backends.compiler import GPUTarget

    names = list(spec.kernel.arg_names)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
    signature = {name: ("constexpr" if name in spec.constexprs else kind) for name, kind in spec.signature.items()}
    src = triton.compiler.ASTSource(fn=spec.kernel, signature=signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})


def measure(spec, arch: int, cuobjdump: Path, workdir: Path) -> dict[str, int]:
    """Compile one spec and read its resources; shared counts Triton's dynamic shared memory as well."""
    kernel = compile_spec(spec, arch)
    usage = resource_usage(kernel.asm["cubin"], cuobjdump, workdir)
    # cuobjdump sees only static shared memory; Triton asks for the rest at launch (dynamic)
    usage["shared"] += int(getattr(kernel.metadata, "shared", 0) or 0)
    usage["spill"] = usage["stack"] + usage["local"]
    return usage


def usage_line(usage: dict[str, int]) -> str:
    return (f"registers {usage['reg']}, spill {usage['spill']} B (stack frame {usage['stack']} B, local "
            f"{usage['local']} B), shared {usage['shared']} B")


def iteration_figures(spec) -> tuple[str, list[str]]:
    """For a vocabulary-loop spec: the text of its iterations at REFERENCE_VOCAB, and the budget violations."""
    if spec.block_v is None:
        return "", []
    from .kernels import cross_entropy

    iterations = -(-REFERENCE_VOCAB // spec.block_v)
    chosen = cross_entropy.config_for(REFERENCE_VOCAB)[0] == spec.block_v
    text = (f"; {iterations} iterations a pass at V={REFERENCE_VOCAB}"
            + (" (the config chosen there)" if chosen else "") + (f"; {spec.note}" if spec.note else ""))
    if chosen and iterations > MAX_ITERATIONS_PER_PASS:
        return text, [f"{iterations} iterations a pass at V={REFERENCE_VOCAB} > {MAX_ITERATIONS_PER_PASS}"]
    return text, []


def liger_reference_specs() -> tuple[list, str]:
    """Liger-Kernel's CE kernel at the config its FLCE launches for V = 152064 (no weight, no softcap, mean,
    gradients in place), bf16 and fp32 logits, and the package's name and version; ([], why not) when
    liger-kernel cannot be imported."""
    try:
        from importlib.metadata import version

        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
    except Exception as err:  # any import failure just means: nothing to compare with
        return [], f"liger-kernel not importable ({type(err).__name__}: {err})"
    from .kernels.common import CompileSpec

    block = min(32768, 1 << (REFERENCE_VOCAB - 1).bit_length())  # Liger: min(MAX_FUSED_SIZE, next_power_of_2(V))
    constexprs = {"weight_ptr": None, "z_loss_ptr": None, "token_accuracy_ptr": None, "predicted_tokens_ptr": None,
                  "lse_square_scale": 0.0, "label_smoothing": 0.0, "reduction": "mean", "softcap": None,
                  "RETURN_Z_LOSS": False, "RETURN_TOKEN_ACCURACY": False, "RETURN_PREDICTED_TOKENS": False,
                  "BLOCK_SIZE": block, "HAS_WEIGHT": False, "HAS_SOFTCAPPING": False, "HAS_GRADIENTS": True}
    kinds = {"X_stride": "i32", "Y_ptr": "*i64", "Y_stride": "i32", "loss_ptr": "*fp32", "loss_stride": "i32",
             "token_accuracy_stride": "i32", "predicted_tokens_stride": "i32", "n_cols": "i32",
             "n_non_ignore": "i32", "sum_non_ignore_weight": "i32", "weight_sum": "fp32", "ignore_index": "i32"}
    specs = []
    for dtype in ("bf16", "fp32"):
        signature = {name: ("constexpr" if name in constexprs else f"*{dtype}" if name == "X_ptr" else kinds[name])
                     for name in liger_cross_entropy_kernel.arg_names}
        specs.append(CompileSpec(f"liger_cross_entropy[{dtype},BLOCK_SIZE={block},warps=32]",
                                 liger_cross_entropy_kernel, signature, constexprs, 32,
                                 aligned=("X_ptr", "Y_ptr", "loss_ptr", "X_stride", "n_cols"), block_v=block))
    return specs, f"liger-kernel {version('liger-kernel')}"


def report_liger(archs: list[int], cuobjdump: Path, workdir: Path) -> None:
    """Print Liger's figures for comparison; a failure here is reported and ignored."""
    specs, about = liger_reference_specs()
    if not specs:
        print(f"info: Liger-Kernel CE not compiled: {about}")
        return
    print(f"info: for comparison, {about}, compiled the same way (never fails the gate):")
    for arch in archs:
        for spec in specs:
            where = f"sm_{arch} {spec.label}"
            try:
                usage = measure(spec, arch, cuobjdump, workdir)
            except Exception as err:  # information only: Liger's signature may change between releases
                print(f"info {where}: not compiled: {type(err).__name__}: {err}")
                continue
            iterations = -(-REFERENCE_VOCAB // spec.block_v)
            print(f"info {where}: {usage_line(usage)}; {iterations} iterations a pass at V={REFERENCE_VOCAB}",
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT),
                        help="compute capabilities to compile for (default: 90 80)")
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary line")
    parser.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel comparison")
    args = parser.parse_args(argv)
    _refuse_interpreter()
    cuobjdump = _cuobjdump()
    specs = all_specs()
    started = time.perf_counter()
    compiled = spills = failures = 0
    failed_specs: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            for spec in specs:
                where = f"sm_{arch} {spec.label}"
                try:
                    usage = measure(spec, arch, cuobjdump, Path(tmp))
                except Exception as err:  # a compile error of any kind fails the gate, with its message
                    failures += 1
                    failed_specs.add(spec.label)
                    print(f"FAIL {where}: {type(err).__name__}: {err}", flush=True)
                    continue
                compiled += 1
                iterations, problems = iteration_figures(spec)
                if usage["spill"] > 0:
                    spills += 1
                    problems.append(f"spills {usage['spill']} B")
                if usage["shared"] > SHARED_LIMIT[arch]:
                    problems.append(f"shared memory {usage['shared']} B > {SHARED_LIMIT[arch]} B")
                failures += bool(problems)
                if problems:
                    failed_specs.add(spec.label)
                if problems or not args.quiet:
                    print(("FAIL " if problems else "ok   ") + f"{where}: {usage_line(usage)}{iterations}"
                          + ("; " + "; ".join(problems) if problems else ""), flush=True)
        if not args.no_liger and not args.quiet:
            report_liger(args.arch, cuobjdump, Path(tmp))
    archs = ", ".join(f"sm_{arch}" for arch in args.arch)
    print(f"compile_check: {len(specs) * len(args.arch)} compiles in {time.perf_counter() - started:.1f} s, "
          f"{failures} failed")
    # K counts kernel configs that compiled cleanly for every requested architecture
    print(f"compile_check: {len(specs) - len(failed_specs)} kernels/configs compiled for {archs}; spills: {spills}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
