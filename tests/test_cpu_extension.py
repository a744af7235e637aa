"""The C++ CPU extension itself (nrt_kernels._cpu, csrc/): loading and its errors, the ABI check, its own argument
checks, and results that are bitwise identical for every thread count and every ISA clone of its hot loops.
Its numbers are checked by the op suites (test_mixit_l1.py runs impl="cpu")."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nrt_kernels
from nrt_kernels import _native, assignments, backends, build_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def native():
    try:
        return _native.load_cpu_extension()
    except _native.NativeExtensionError as error:
        pytest.skip(str(error))


def make_inputs(batch, sources, mixtures, length, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, sources, length, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(batch, mixtures, length, generator=gen, dtype=torch.float64).to(dtype))


def test_extension_accepts_strided_views(native):
    est, mix = make_inputs(2, 3, 2, 40, seed=9)
    masks = assignments.candidate_masks(3, 2, "generalized")
    strided = native.mixit_l1_forward(est.transpose(1, 2).contiguous().transpose(1, 2), mix, masks, False)
    dense = native.mixit_l1_forward(est, mix, masks, False)
    assert all(torch.equal(a, b) for a, b in zip(strided, dense))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_extension_mean_is_autograds_mean_bit_for_bit(native, dtype):
    # The eager path folds the rows' mean and its backward into the kernels: the numbers must be torch's own.
    est, mix = make_inputs(5, 4, 2, 33, seed=21, dtype=dtype)
    masks = assignments.candidate_masks(4, 2, "generalized")
    rows, best = native.mixit_l1_forward(est, mix, masks, False)
    mean, mean_best = native.mixit_l1_forward(est, mix, masks, True)
    assert mean.dim() == 0 and torch.equal(mean, rows.mean()) and torch.equal(mean_best, best)
    grad = torch.tensor(0.7, dtype=rows.dtype)
    by_rows = native.mixit_l1_backward(grad.expand(5) / 5, est, mix, best, masks, True, False)
    by_mean = native.mixit_l1_backward(grad, est, mix, best, masks, True, True)
    assert all(torch.equal(a, b) for a, b in zip(by_rows, by_mean))
    with pytest.raises(RuntimeError, match="0-dim"):
        native.mixit_l1_backward(grad.expand(5), est, mix, best, masks, False, True)


def test_extension_checks_its_own_arguments(native):
    est, mix = make_inputs(2, 3, 2, 10, seed=15)
    masks = assignments.candidate_masks(3, 2, "generalized")
    with pytest.raises(RuntimeError, match="one dtype"):
        native.mixit_l1_forward(est, mix.float(), masks, False)
    with pytest.raises(RuntimeError, match="masks"):
        native.mixit_l1_forward(est, mix, masks.long(), False)
    _, best = native.mixit_l1_forward(est, mix, masks, False)
    with pytest.raises(RuntimeError, match="candidate index"):
        native.mixit_l1_backward(torch.ones(2, dtype=torch.float64), est, mix, best + len(masks), masks, False, False)


def test_abi_version_matches_and_a_stale_module_is_rebuilt(native, monkeypatch):
    assert native.ABI_VERSION == build_config.CPU_ABI_VERSION
    if _native._import_prebuilt() is None:
        pytest.skip("no prebuilt module (it was compiled just in time): nothing stale to refuse")
    # A prebuilt module of another ABI version is never used: the loader compiles the sources instead.
    monkeypatch.setattr(build_config, "CPU_ABI_VERSION", build_config.CPU_ABI_VERSION + 1)
    assert _native._import_prebuilt() is None


def _loss_and_grads(est, mix):
    est = est.detach().clone().requires_grad_(True)
    mix = mix.detach().clone().requires_grad_(True)
    loss, assignment = nrt_kernels.mixit_loss(est, mix, impl="cpu", reduction="none", return_assignment=True)
    return (loss, assignment, *torch.autograd.grad(loss.sum(), (est, mix)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_identical_for_any_thread_count(native, dtype):
    est, mix = make_inputs(3, 5, 2, 2 * 9000, dtype=dtype, seed=13)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (threads, 1, 3):
            torch.set_num_threads(count)
            results.append(_loss_and_grads(est, mix))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# Run in a subprocess: it rewrites the extension's ifunc slots (the GOT entries of its IRELATIVE relocations) to
# each ISA clone in turn (and caps the kernels that pick their own variant with NRT_CPU_ISA), computes the same losses
# and gradients with each, and compares them bitwise.
ISA_CLONES_SCRIPT = r'''
import ctypes, json, os, subprocess, sys
import torch
import nrt_kernels
from nrt_kernels import _native

torch.manual_seed(0)
torch.set_num_threads(1)
path = os.path.realpath(_native.load_cpu_extension().__file__)
slots = {}  # offset of the GOT slot -> address of the resolver that filled it
for line in subprocess.run(["readelf", "-rW", path], capture_output=True, text=True, check=True).stdout.splitlines():
    fields = line.split()
    if len(fields) >= 4 and fields[2].endswith("IRELATIVE"):
        slots[int(fields[0], 16)] = int(fields[3], 16)
symbols = {}
for line in subprocess.run(["nm", path], capture_output=True, text=True, check=True).stdout.splitlines():
    fields = line.split()
    if len(fields) == 3:
        symbols.setdefault(fields[2], int(fields[0], 16))
resolvers = {address: name[: -len(".resolver")] for name, address in symbols.items() if name.endswith(".resolver")}
if not slots or not all(address in resolvers for address in slots.values()):
    print(json.dumps({"skip": f"{len(slots)} ifunc slots, not all from target_clones resolvers"}))
    sys.exit(0)
with open("/proc/self/maps") as maps:
    base = min(int(line.split("-")[0], 16) for line in maps if line.rstrip().endswith(path))
with open("/proc/cpuinfo") as cpuinfo:
    flags = next(line for line in cpuinfo if line.startswith("flags")).split()
isas = ["default"] + [isa for isa in ("avx2", "avx512f") if isa in flags]

libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
for offset in slots:
    page = (base + offset) & ~4095
    assert libc.mprotect(page, 4096, 3) == 0, "mprotect failed"  # PROT_READ | PROT_WRITE

def slot_targets():
    return {offset: ctypes.c_uint64.from_address(base + offset).value for offset in slots}

def clone(offset, isa):
    return base + symbols[resolvers[slots[offset]] + "." + isa]

# The loader filled every slot with the clone of the best ISA this CPU has: proof these are the right slots.
assert all(target == clone(offset, isas[-1]) for offset, target in slot_targets().items()), "unexpected ifunc slots"

def workload():
    out = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for batch, sources, mixtures, length in ((3, 5, 2, 9000 + 13), (2, 3, 3, 37)):
            gen = torch.Generator().manual_seed(sources)
            est = torch.randn(batch, sources, length, generator=gen).to(dtype).requires_grad_(True)
            mix = torch.randn(batch, mixtures, length, generator=gen).to(dtype).requires_grad_(True)
            loss, best = nrt_kernels.mixit_loss(est, mix, impl="cpu", reduction="none", return_assignment=True)
            out += [loss, best, *torch.autograd.grad(loss.sum(), (est, mix))]
        est, targets, teacher = (torch.randn(2, 4, 2, 3000, generator=gen).to(dtype) for _ in range(3))
        est.requires_grad_(True)
        for version, weights in (("v1", [1, 2, 1]), ("v2", [0.5, 0.5, 2, 0.5])):
            loss = nrt_kernels.noise_robust_loss(est, targets, version=version, weights=weights,
                                                 teacher_targets=teacher, pairing=torch.tensor([2, 0, 3, 1]),
                                                 impl="cpu")
            out += [loss, *torch.autograd.grad(loss, est)]
    return out

results = {}
for isa in isas:
    os.environ["NRT_CPU_ISA"] = isa  # the kernels that pick a variant per ISA themselves (csrc/cpu/isa.h)
    for offset in slots:
        ctypes.c_uint64.from_address(base + offset).value = clone(offset, isa)
    assert all(target == clone(offset, isa) for offset, target in slot_targets().items())
    results[isa] = workload()
different = [isa for isa in isas[1:] if not all(torch.equal(a, b) for a, b in zip(results[isas[0]], results[isa]))]
print(json.dumps({"isas": isas, "slots": len(slots), "different": different}))
'''


@pytest.mark.skipif(sys.platform != "linux" or not (shutil.which("readelf") and shutil.which("nm")),
                    reason="needs Linux and binutils (readelf, nm) to find the ifunc slots")
def test_isa_clones_are_bitwise_identical(native):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", ISA_CLONES_SCRIPT], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    if len(report["isas"]) < 2:
        pytest.skip("this CPU runs only the baseline clone")
    assert report["slots"] > 0 and report["different"] == [], report


def test_cpu_isa_cap_must_name_a_clone(native, monkeypatch):
    est, targets = make_inputs(1, 4, 4, 40, dtype=torch.float32)
    pair_masks, source_weights = torch.tensor([5], dtype=torch.int32), torch.empty(0)
    masks = assignments.candidate_masks(4, 2, "generalized")
    args = (est, targets, torch.empty(0), pair_masks, source_weights)
    best = native.noise_robust_l1_forward(*args, masks, [1.0, 0.0, 2.0, 0.0], 1.0)[2]
    monkeypatch.setenv("NRT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="NRT_CPU_ISA must be default, avx2 or avx512f, got sse9"):
        native.noise_robust_l1_backward(torch.ones(()), *args, best, masks, [1.0, 0.0, 2.0, 0.0], 1.0)


def _forget_cpu_backends(monkeypatch):
    # A fresh process as far as the CPU backends go: nothing loaded or registered.
    for op in ("mixit_l1", "noise_robust_l1"):
        monkeypatch.delitem(backends._registry, (op, "cpu"), raising=False)
        monkeypatch.delitem(sys.modules, backends.BACKEND_MODULES[(op, "cpu")], raising=False)
    monkeypatch.setattr(_native, "load_cpu_extension", _native.load_cpu_extension.__wrapped__)
    monkeypatch.setattr(backends, "_fallbacks_said", set())


def test_auto_prefers_the_extension_on_cpu(monkeypatch):
    assert backends.resolve("mixit_l1", "auto", "cpu") == "cpu"
    _forget_cpu_backends(monkeypatch)
    monkeypatch.setattr(_native, "_import_prebuilt", lambda: None)
    monkeypatch.setattr(_native, "_compile_just_in_time", lambda: (_ for _ in ()).throw(OSError("no compiler")))
    with pytest.warns(RuntimeWarning, match='impl="auto" runs mixit_l1 on the reference loop'):
        assert backends.resolve("mixit_l1", "auto", "cpu") == "reference"


def test_missing_extension_says_how_to_get_it(monkeypatch):
    def no_compiler():
        raise OSError("no C++ compiler found")

    _forget_cpu_backends(monkeypatch)
    monkeypatch.setattr(_native, "_import_prebuilt", lambda: None)
    monkeypatch.setattr(_native, "_compile_just_in_time", no_compiler)
    for op in ("mixit_l1", "noise_robust_l1"):
        with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e .") as error:
            backends.resolve(op, "cpu", "cpu")
        assert "no C++ compiler found" in str(error.value)
        # "auto" falls back to the reference, and says so once.
        with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler found"):
            assert backends.resolve(op, "auto", "cpu") == "reference"


def test_missing_sources_say_how_to_get_it(monkeypatch, tmp_path):
    # An install without the C++ sources (and without a usable prebuilt module) cannot compile them.
    monkeypatch.setattr(_native, "_source_root", lambda: tmp_path)
    with pytest.raises(_native.NativeExtensionError, match="sources are not installed.*pip install"):
        _native._compile_just_in_time()


def test_cpu_impl_rejects_other_devices():
    with pytest.raises(RuntimeError, match='impl="cpu" runs on CPU tensors'):
        backends.resolve("mixit_l1", "cpu", "cuda")


def test_import_compiles_nothing():
    code = "import sys, nrt_kernels; assert 'nrt_kernels._native' not in sys.modules, 'import loaded the extension'"
    subprocess.run([sys.executable, "-c", code], check=True)
