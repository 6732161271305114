"""The compiled core was built as this machine allows."""

import shutil

import lora_da


def test_cuda_backend_compiled_wherever_nvcc_is_found():
    info = lora_da.build_info()
    assert info["blas"] == "scipy-openblas32"
    if shutil.which("nvcc"):  # CI machines have nvcc: the CUDA backend must compile there
        assert info["cuda"] is True
