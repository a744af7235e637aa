"""Compile every Triton kernel the package launches for a CUDA target, on a machine without a GPU.

    python tests/compile_check.py [--arch 90]      (tests/test_triton_compiles.py runs it)

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not that the installed Triton's
compiler accepts them; versions differ (CI takes the newest Triton, GPU machines may have an older one).
This script runs representative calls of every fused op with each kernel launch replaced by a compile of
the same kernel, arguments and constexprs for ``GPUTarget("cuda", arch, 32)``, and prints one line per
kernel with its registers and stack frame as ptxas allocated them (read from the cubin by cuobjdump). A kernel
with a stack frame spills registers to it, which ran the MixIT partials 2.5x slower on an H200: that fails the check
too. The launches' outputs stay uninitialised: only compilation is checked.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")
compiled: dict = {}
failures: list = []


def _signature(kernel: JITFunction, args, kwargs):
    signature, constexprs = {}, {}
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{param.name}: cannot type {type(value).__name__}")
    return signature, constexprs


def _cuobjdump():
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes):
    """{"registers", "stack_bytes"} of a cubin's kernel, or None without cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return dict(registers=int(match[1]), stack_bytes=int(match[2])) if match else None


def _compile_only(self: JITFunction, grid):
    def launch(*args, **kwargs):
        signature, constexprs = _signature(self, args, kwargs)
        key = (self.fn.__name__, tuple(sorted((k, str(v)) for k, v in {**signature, **constexprs}.items())),
               tuple(kwargs.get(o) for o in _OPTIONS))
        if key in compiled:
            return
        options = {o: kwargs[o] for o in _OPTIONS if o in kwargs}
        try:
            kernel = triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs),
                                    target=TARGET, options=options)
            compiled[key] = kernel
            usage = _resource_usage(kernel.asm["cubin"])
            print(f"ok    {self.fn.__name__:40s} {usage or 'resources unknown'} {options} {constexprs}")
            if usage and usage["stack_bytes"]:
                failures.append((self.fn.__name__, constexprs, f"spills registers: {usage}"))
                print(f"FAIL  {self.fn.__name__} spills registers to its stack frame")
        except Exception as error:  # report every failure, keep checking the others
            failures.append((self.fn.__name__, constexprs, error))
            print(f"FAIL  {self.fn.__name__:40s} {constexprs}\n{error}")
    return launch


def main() -> int:
    global TARGET
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    TARGET = GPUTarget("cuda", args.arch, 32)
    JITFunction.__getitem__ = _compile_only

    from nrt_kernels import backends

    # CPU tensors stand in for CUDA ones: let them through to the (compile-only) launches.
    backends.triton_interpreted = lambda: True
    backends._triton_kernels_interpreted = lambda: True
    from nrt_kernels.ops import _triton_launch

    _triton_launch.INTERPRETED = False  # the GPU's launch configs (ops that size them for the interpreter read it)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    _check_mixit((torch.float32, torch.bfloat16, torch.float16, torch.float64),
                 ((4, 2, "generalized"), (4, 2, "equal"), (8, 2, "generalized"), (3, 3, "generalized"),
                  (1, 2, "generalized")))
    # Each case turns a different set of terms (constexpr flags), dtypes and source counts on.
    _check_noise_robust([("v1", [1, 2, 1], torch.float64, 4, None), ("v1", [1, 0, 0], torch.float32, 4, None),
                         ("v2", [0, 0, 0, 1], torch.float32, 4, None), ("v2", [0, 1, 0, 0], torch.float16, 4, None),
                         ("v2", [1, 0.5, 2, 1], torch.float32, 4, [1, 2, 1, 1]),
                         ("v2", [0.5, 0.5, 2, 0.5], torch.bfloat16, 8, None),
                         ("v1", [1, 2, 1], torch.float32, 2, None)])
    # The Gram metrics: every metric, input dtype and Gram padding (16 or 32 signals), both backward variants.
    _check_mixit_gram([("sisdr", torch.float32, 4, 2, {}, True), ("sdsdr", torch.bfloat16, 4, 2, {}, False),
                       ("snr", torch.float16, 4, 2, {}, False), ("mse", torch.float64, 4, 2, {}, True),
                       ("log_mse", torch.float32, 16, 2, {}, False),
                       ("sisdr", torch.bfloat16, 16, 2, {"zero_mean": False}, False),
                       ("sdsdr", torch.float32, 8, 3, {}, False)])
    # The pipelined partials loops that the GPU tune scripts sweep: they must compile, without spills, too.
    for stages in (2, 3, 4):
        _check_pipelined(stages)
    # Every metric (constexpr METRIC / IS_L1 / CENTERED), both solvers, the source paddings MP = 16 and 32.
    _check_pit([("sisdr", "exhaustive", torch.float32, 3), ("sdsdr", "hungarian", torch.float32, 4),
                ("snr", "exhaustive", torch.float64, 2), ("mse", "hungarian", torch.bfloat16, 4),
                ("l1", "exhaustive", torch.float16, 3), ("log_mse", "hungarian", torch.float32, 4),
                ("sisdr", "exhaustive", torch.float32, 8), ("sisdr", "hungarian", torch.float32, 16),
                ("sisdr", "hungarian", torch.float32, 32), ("l1", "hungarian", torch.float32, 32)])
    print(f"{len(compiled)} kernels compiled, {len(failures)} failed")
    return 1 if failures else 0


def _check_mixit(dtypes, cases):
    import nrt_kernels

    for dtype in dtypes:
        for sources, mixtures, partitions in cases:
            est = torch.randn(2, sources, 2, 300).to(dtype).requires_grad_(True)
            mix = torch.randn(2, mixtures, 2, 300).to(dtype).requires_grad_(True)
            loss = nrt_kernels.mixit_loss(est, mix, partitions=partitions, impl="triton")
            loss.backward()


def _check_mixit_gram(cases):
    import nrt_kernels

    for metric, dtype, sources, mixtures, options, mixtures_grad in cases:
        est = torch.randn(2, sources, 2, 300).to(dtype).requires_grad_(True)
        mix = torch.randn(2, mixtures, 2, 300).to(dtype).requires_grad_(mixtures_grad)
        loss = nrt_kernels.mixit_loss(est, mix, metric=metric, impl="triton", **options)
        loss.backward()


def _check_pipelined(stages):
    from dataclasses import replace

    from nrt_kernels.ops.mixit_l1 import triton as mixit_triton
    from nrt_kernels.ops.noise_robust_l1 import triton as noise_robust_triton

    for dtype in (torch.float32, torch.bfloat16):
        est, mix = torch.randn(2, 4, 600).to(dtype), torch.randn(2, 2, 600).to(dtype)
        config = replace(mixit_triton.default_partials_config(4, 2), loop_stages=stages)
        mixit_triton.forward(est, mix, "generalized", config)
    for weights, dtype in (([1.0, 0.0, 2.0, 1.0], torch.float32), ([0.5, 0.5, 2.0, 0.5], torch.bfloat16)):
        est, targets, teacher = (torch.randn(2, 4, 300).to(dtype) for _ in range(3))
        masks = torch.tensor([0b0011, 0b0101], dtype=torch.int32)
        noise_robust_triton.forward(est, targets, teacher, masks, est.new_empty(0, dtype=torch.float32), weights,
                                    4.0, noise_robust_triton.PartialsConfig(loop_stages=stages))


def _check_noise_robust(cases):
    import nrt_kernels

    for version, weights, dtype, sources, source_weights in cases:
        est = torch.randn(2, sources, 1, 300).to(dtype).requires_grad_(True)
        targets, teacher = torch.randn(2, sources, 1, 300).to(dtype), torch.randn(2, sources, 1, 300).to(dtype)
        loss = nrt_kernels.noise_robust_loss(est, targets, version=version, weights=weights, teacher_targets=teacher,
                                             pairing=torch.arange(sources), source_weights=source_weights,
                                             impl="triton")
        loss.backward()



def _check_pit(cases):
    import nrt_kernels

    for metric, solver, dtype, sources in cases:
        est = torch.randn(2, sources, 300).to(dtype).requires_grad_(True)
        targets = torch.randn(2, sources, 300).to(dtype).requires_grad_(True)
        loss = nrt_kernels.pit_loss(est, targets, metric=metric, solver=solver, impl="triton")
        loss.backward()


if __name__ == "__main__":
    sys.exit(main())
