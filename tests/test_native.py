"""The compiled core was built as this machine allows."""

import shutil

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
