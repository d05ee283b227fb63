"""The build switch of setup.py and the loaded library."""
import importlib.util
import pathlib

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
