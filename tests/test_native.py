"""The compiled core was built as this machine allows, and says how (``lora_da.build_info``)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import lora_da


def test_cuda_backend_compiled_wherever_nvcc_is_found():
    info = lora_da.build_info()
    assert info["blas"] == "scipy-openblas32"
    if shutil.which("nvcc"):  # CI machines have nvcc: the CUDA backend must compile there
        assert info["cuda"] is True


def test_the_core_matches_these_sources():
    """The compiled core in use has the named request interface of csrc/bindings.cpp
    (an older build, e.g. a stale copy in site-packages, has positional entry points)."""
    from lora_da._native import core

    module = core()
    for request in (module.DenseRequest, module.GuidanceRequest):
        assert {"batch", "n", "dtype", "k", "eigenvectors", "device"} <= set(request.required_fields)
        assert set(request.required_fields) <= set(request.fields)


def test_cuda_architectures_are_set_once():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "CMakeLists.txt").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    settings = re.findall(r"CMAKE_CUDA_ARCHITECTURES|CUDA_ARCHITECTURES\s+\"|set\(LORA_DA_CUDA_ARCHITECTURES", code)
    assert settings == ["set(LORA_DA_CUDA_ARCHITECTURES", 'CUDA_ARCHITECTURES "'], settings


# ---- lora_da.build_info(): what was built, checked against the module file itself ----

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _core_file() -> pathlib.Path:
    from lora_da._native import core

    return pathlib.Path(core().__file__)


def test_build_info_fields_and_types():
    info = lora_da.build_info()
    assert set(info) == {
        "version", "cuda", "cuda_requested", "cuda_architectures", "cuda_compiler", "cuda_runtime",
        "cxx_compiler", "build_type", "blas", "blas_version", "python",
    }
    assert info["version"] == lora_da.__version__
    assert info["cuda_requested"] in ("AUTO", "ON", "OFF")
    assert re.fullmatch(r"\S+ \d+(\.\d+)+", info["cxx_compiler"]), info["cxx_compiler"]
    assert info["build_type"] in ("Release", "RelWithDebInfo", "Debug", "MinSizeRel"), info["build_type"]
    assert re.fullmatch(r"\d+(\.\d+)+", info["blas_version"]), info["blas_version"]
    # the extension's file name carries the Python it was built for (cpython-311 for 3.11)
    tag = "cpython-%d%d" % tuple(int(part) for part in info["python"].split(".")[:2])
    assert tag in _core_file().name, (tag, _core_file().name)


def test_build_info_cuda_fields_agree_with_the_module_file():
    """``cuda`` against the binary itself: only the CUDA backend names the cuBLAS library
    it loads; architectures and compiler are given exactly when CUDA is in."""
    info = lora_da.build_info()
    has_cuda_code = b"libcublas.so" in _core_file().read_bytes()
    assert info["cuda"] is has_cuda_code
    if info["cuda_requested"] == "ON":
        assert info["cuda"] is True
    if info["cuda_requested"] == "OFF":
        assert info["cuda"] is False
    if info["cuda"]:
        declared = re.search(r"set\(LORA_DA_CUDA_ARCHITECTURES ([\d ]+)\)", (ROOT / "CMakeLists.txt").read_text())
        assert info["cuda_architectures"] == [int(a) for a in declared.group(1).split()]
        assert re.fullmatch(r"NVIDIA \d+\.\d+\.\d+", info["cuda_compiler"]), info["cuda_compiler"]
        assert info["cuda_runtime"] == "static"
    else:
        assert info["cuda_architectures"] == [] and info["cuda_compiler"] is None and info["cuda_runtime"] is None


# ---- configuring with CUDA requested and no nvcc fails loudly (configure only) ----

def _configure(tmp_path, *defines, env=None):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake on the PATH (pip install cmake)")
    environment = {k: v for k, v in os.environ.items() if k not in ("LORA_DA_CUDA", "CUDACXX")}
    environment.update(env or {})
    command = [cmake, "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}"]
    try:
        import pybind11

        command.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
    except ImportError:
        pass
    done = subprocess.run(command + list(defines), capture_output=True, text=True, env=environment, timeout=120)
    return done.returncode, done.stdout + done.stderr


REFUSAL = "the CUDA backend was requested (LORA_DA_CUDA=ON) but no CUDA compiler was found"


def test_cuda_requested_by_option_without_nvcc_fails_to_configure(tmp_path):
    code, output = _configure(tmp_path, "-DLORA_DA_CUDA=ON", "-DCMAKE_CUDA_COMPILER=/nonexistent/nvcc")
    assert code != 0
    assert REFUSAL in " ".join(output.split()), output[-2000:]


def test_cuda_requested_by_environment_without_nvcc_fails_to_configure(tmp_path):
    code, output = _configure(tmp_path, "-DCMAKE_CUDA_COMPILER=/nonexistent/nvcc", env={"LORA_DA_CUDA": "on"})
    assert code != 0
    assert REFUSAL in " ".join(output.split()), output[-2000:]


def test_a_bad_cuda_request_is_refused(tmp_path):
    code, output = _configure(tmp_path, "-DLORA_DA_CUDA=maybe")
    assert code != 0
    assert "LORA_DA_CUDA must be AUTO, ON or OFF, got 'maybe'" in " ".join(output.split()), output[-2000:]


def test_cuda_auto_without_nvcc_configures_the_cpu_backend(tmp_path):
    pytest.importorskip("pybind11")
    pytest.importorskip("scipy_openblas32")
    code, output = _configure(tmp_path, "-DCMAKE_CUDA_COMPILER=/nonexistent/nvcc")
    assert code == 0, output[-2000:]
    assert "lora_da: CUDA backend disabled (LORA_DA_CUDA=AUTO: no CUDA compiler found)" in output
    assert REFUSAL not in " ".join(output.split())
