"""Ahead-of-time compile gate for the Triton kernels, no GPU needed.

    python -m nitp_kernels.compile_check [--arch 90 80] [--quiet]

Compiles every kernel at every config its launcher can choose (each kernel module's `compile_specs()`) for
sm_90 and sm_80 through triton.compile with an explicit GPUTarget, reads registers, shared memory and spill
(local) bytes of each cubin with the cuobjdump Triton ships (triton/backends/nvidia/bin/), prints one line per
kernel and config, then `compile_check: K kernels/configs compiled for sm_90, sm_80; spills: S`.
Exits non-zero on a compile error, any spill, or shared memory over the chip's limit (the compiler accepts an
over-budget kernel; the launch would fail on the GPU). triton.compile fails under TRITON_INTERPRET, so the
variable is refused here rather than silently unset.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT),
                        help="compute capabilities to compile for (default: 90 80)")
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary line")
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
                    kernel = compile_spec(spec, arch)
                    usage = resource_usage(kernel.asm["cubin"], cuobjdump, Path(tmp))
                except Exception as err:  # a compile error of any kind fails the gate, with its message
                    failures += 1
                    failed_specs.add(spec.label)
                    print(f"FAIL {where}: {type(err).__name__}: {err}", flush=True)
                    continue
                compiled += 1
                # cuobjdump sees only static shared memory; Triton asks for the rest at launch (dynamic)
                usage["shared"] += int(getattr(kernel.metadata, "shared", 0) or 0)
                problems = []
                if usage["local"] > 0:
                    spills += 1
                    problems.append(f"spills {usage['local']} B to local memory")
                if usage["shared"] > SHARED_LIMIT[arch]:
                    problems.append(f"shared memory {usage['shared']} B > {SHARED_LIMIT[arch]} B")
                failures += bool(problems)
                if problems:
                    failed_specs.add(spec.label)
                line = (f"{where}: registers {usage['reg']}, shared {usage['shared']} B, "
                        f"local (spill) {usage['local']} B, stack {usage['stack']} B")
                if problems or not args.quiet:
                    print(("FAIL " if problems else "ok   ") + line + ("; " + "; ".join(problems) if problems else ""),
                          flush=True)
    archs = ", ".join(f"sm_{arch}" for arch in args.arch)
    print(f"compile_check: {len(specs) * len(args.arch)} compiles in {time.perf_counter() - started:.1f} s, "
          f"{failures} failed")
    # K counts kernel configs that compiled cleanly for every requested architecture
    print(f"compile_check: {len(specs) - len(failed_specs)} kernels/configs compiled for {archs}; spills: {spills}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
