"""bench/device_check.sh, the one-shot GPU check, runs here as ``--dry-run`` (CPU, tiny
sizes) so that it cannot rot before a GPU machine runs it.

The dry run takes ~1 minute on 2 cores: every step starts its own Python.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "device_check.sh"
STEPS = ["environment", "install", "smoke", "tests_kernels", "tests_cuda", "kfac_kernels", "init_overhead",
         "lobpcg", "offset_probe"]


def _dummy_wheel(directory: pathlib.Path) -> pathlib.Path:
    """A minimal pure-Python wheel, so that the install step runs pip offline here."""
    name, version = "device_check_dummy", "0.1"
    files = {
        f"{name}/__init__.py": b"VALUE = 1\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{name}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def _run(tmp_path: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, **env)
    # the lora_da that this test imports is the one the steps use
    import lora_da

    package_root = str(pathlib.Path(lora_da.__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment,
                          cwd=tmp_path, timeout=600)


def _summary(out: pathlib.Path) -> dict:
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        name, status = line.split()[:2]
        rows[name] = status
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("device_check")
    _dummy_wheel(tmp_path / "wheels")
    done = _run(tmp_path, "--dry-run", "--wheels", str(tmp_path / "wheels"))
    return done, tmp_path / "out"


def test_dry_run_passes_every_step_it_can(dry_run):
    done, out = dry_run
    log = (out / "log.txt").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:] + log[-4000:]
    summary = _summary(out)
    assert list(summary) == STEPS
    assert summary.pop("tests_kernels") == "SKIP"  # needs CUDA: skipped, saying so
    assert "dry run: the kernel tests need CUDA" in log
    assert set(summary.values()) == {"PASS"}, summary


def test_dry_run_writes_what_the_gpu_run_brings_back(dry_run):
    done, out = dry_run
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files  # the device tool brings back at most 8 files
    assert {"log.txt", "summary.txt", "junit_cuda.xml", "init_overhead.md", "lobpcg.md"} <= set(files), files
    suite = ElementTree.parse(out / "junit_cuda.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    log = (out / "log.txt").read_text()
    # the smoke test's seven checks, the probe's three, and the pip install of the carried wheel
    assert log.count("\nPASS ") >= 10 and "\nFAIL " not in log
    assert "device_smoke: 7 passed, 0 failed" in log and "offset_probe: 3 passed, 0 failed" in log
    assert "device_check_dummy-0.1-py3-none-any.whl" in log
    table = (out / "init_overhead.md").read_text()
    assert "| warm-up on 1 batch(es), not in the totals |" in table and "| plain forward+backward |" in table
    assert "Largest principal angle" in table


def test_budget_spent_skips_steps_and_fails(tmp_path):
    """A budget too small for any step: nothing runs, every step says why, exit status 1."""
    done = _run(tmp_path, "--dry-run", DEVICE_CHECK_BUDGET="5")
    assert done.returncode == 1
    summary = _summary(tmp_path / "out")
    assert list(summary) == STEPS
    statuses = set(summary.values())
    assert statuses <= {"SKIP"}, summary
    assert "time budget spent" in (tmp_path / "out" / "summary.txt").read_text()


def test_unknown_argument_is_refused(tmp_path):
    done = _run(tmp_path, "--dryrun")
    assert done.returncode == 2 and "unknown argument '--dryrun'" in done.stderr
