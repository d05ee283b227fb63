"""The build switch of setup.py and the loaded library."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

import pconv_cuda

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_setup():
    spec = importlib.util.spec_from_file_location("pconv_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("torch_cuda, home, force, expected", [
    (True, "/usr/local/cuda", "0", True),
    (True, None, "0", False),
    (False, "/usr/local/cuda", "0", False),
    (False, None, "1", True),
    (False, "/usr/local/cuda", None, False),
])
def test_want_cuda(torch_cuda, home, force, expected, monkeypatch):
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    assert _load_setup().want_cuda(torch_cuda, home, force) is expected


def test_force_cuda_read_from_environment(monkeypatch):
    setup = _load_setup()
    monkeypatch.setenv("FORCE_CUDA", "1")
    assert setup.want_cuda(False, None) is True
    monkeypatch.setenv("FORCE_CUDA", "0")
    assert setup.want_cuda(False, None) is False


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only build")
def test_cpu_torch_builds_a_cpp_extension_without_cuda_sources(monkeypatch):
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    ext = _load_setup().make_extension()
    assert ext.name == "pconv_cuda._C"
    assert "csrc/pconv.cpp" in ext.sources
    assert any(s.startswith("csrc/cpu/") for s in ext.sources)
    assert not any(s.endswith(".cu") for s in ext.sources)


def test_force_cuda_without_toolkit_is_a_clear_error(monkeypatch):
    setup = _load_setup()
    monkeypatch.setenv("FORCE_CUDA", "1")
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(RuntimeError, match="no CUDA toolkit was found: set CUDA_HOME"):
        setup.make_extension()


def test_library_registers_both_ops_for_cpu():
    for name in ("pconv::partial_conv2d", "pconv::partial_conv2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    if torch.version.cuda is None:
        assert not pconv_cuda.has_cuda_kernels()
    if torch.cuda.is_available():
        assert pconv_cuda.has_cuda_kernels()


def test_library_uses_only_the_stable_abi(monkeypatch):
    # One build loads in every Python from 3.10 on: the GPU machine's Python may differ
    # from the one that built it (tools/prebuild_device.sh).
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    assert _load_setup().make_extension().py_limited_api
    assert pconv_cuda._C.__file__.endswith("_C.abi3.so")


def _prebuilt(tmp_path, *args):
    script = f'source "{ROOT}/tools/prebuilt.sh"; ' + " ".join(args)
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)


def test_prebuilt_library_matches_only_its_sources_and_torch(tmp_path):
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "kernel.cpp").write_text("int f() { return 1; }\n")
    (tmp_path / "setup.py").write_text("# setup\n")
    digest = _prebuilt(tmp_path, "source_hash .").stdout.strip()
    assert len(digest) == 16
    (tmp_path / "prebuilt").mkdir()
    (tmp_path / "prebuilt" / "_C.abi3.so").write_bytes(b"\x7fELF")
    (tmp_path / "prebuilt" / "STAMP").write_text(f"torch=2.11.0+cu130\nsources={digest}\n")

    def matches(version):
        return _prebuilt(tmp_path, "prebuilt_matches .", version).returncode == 0

    assert matches("2.11.0+cu130")
    assert not matches("2.11.0")  # another build of torch: its ABI may differ
    (tmp_path / "csrc" / "cpu" / "kernel.cpp").write_text("int f() { return 2; }\n")
    assert not matches("2.11.0+cu130")
    # A new source file changes the hash too.
    (tmp_path / "csrc" / "cpu" / "kernel.cpp").write_text("int f() { return 1; }\n")
    assert matches("2.11.0+cu130")
    (tmp_path / "csrc" / "extra.h").write_text("\n")
    assert not matches("2.11.0+cu130")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


SASS = """
\t\tFunction : _Z6kernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E R3, desc[UR4][R6.64] ;          /* 0x0000000406037981 */
        /*0020*/                   FFMA.FTZ R2, R3, R4, R2 ;             /* 0x0000000403027223 */
        /*0030*/                   HMMA.16816.F32.BF16 R8, R4, R2, R8 ;  /* 0x000000020408723c */
        /*0040*/               @P0 BRA 0x10 ;                            /* 0xfffffff000f00947 */
        /*0050*/                   IADD3 R7, R7, 0x1, RZ ;               /* 0x0000000107077810 */
        /*0060*/              @!P1 BRA 0x0 ;                             /* 0xfffffff800848947 */
        /*0070*/                   BRA 0x90 ;                            /* 0x0000000000047947 */
        /*0080*/                   DFMA R8, R8, R8, R8 ;                 /* 0x0000000808087223 */
        /*0090*/                   EXIT ;                                /* 0x000000000000794d */
"""


def test_sass_loops_finds_the_innermost_loop_and_its_fmas():
    """tools/sass_loops.py: of the loop nested in another (backward branches to 0x10 and to
    0x0), only the inner one counts; a forward branch is no loop."""
    tool = _load_tool("sass_loops")
    code = tool.parse(SASS)["_Z6kernelv"]
    assert [a for a, _, _ in code] == list(range(0, 0xa0, 0x10))
    (loop,) = tool.innermost_loops(code)
    assert (loop.start, loop.end) == (0x10, 0x40)
    assert loop.instructions == 4 and loop.fmas == 1 and loop.mmas == 1
    assert loop.opcodes["BRA"] == 1 and loop.opcodes["LDG.E"] == 1
