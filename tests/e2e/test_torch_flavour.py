"""The image build's torch guards, in a real ``docker build`` (up to the builder stage, no image tagged).

With the CPU wheel that scripts/docker-setup.sh leaves in ``docker/wheels/``:

- a CUDA build (``TORCH_FLAVOUR=cuda``, bare ``TORCH_VERSION``) does not take that wheel: with no index it finds
  no torch at all instead of installing the CPU one (with PyPI it would download the CUDA build, several GB,
  which scripts/build-cuda-image.sh does);
- a CUDA build told to install that wheel (``TORCH_VERSION=2.13.0+cpu``) stops at the check with one line;
- the CPU build of the same wheel passes the check (the Compose build of the CPU image, whose cache it shares).

The CPU image refusing a CUDA torch is covered without the 3 GB download by tests/test_torch_flavour_check.py.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.e2e.conftest import BASE_IMAGE, REPO_ROOT, TORCH_VERSION, _copy_host_ca_bundle, run

pytestmark = pytest.mark.docker

PUBLIC_VERSION = TORCH_VERSION.removesuffix("+cpu")


@pytest.fixture(scope="module")
def cpu_wheel(docker_engine: None) -> str:
    """The name of the CPU torch wheel in docker/wheels (put there by scripts/docker-setup.sh)."""
    wheels = sorted((REPO_ROOT / "docker" / "wheels").glob(f"torch-{TORCH_VERSION}-*.whl"))
    assert wheels, f"no torch-{TORCH_VERSION} wheel in docker/wheels (bash scripts/docker-setup.sh puts it there)"
    _copy_host_ca_bundle()
    return wheels[0].name


def build_builder_stage(**build_args: str) -> subprocess.CompletedProcess[str]:
    """``docker build --target builder`` with these build arguments and the suite's local base image."""
    args = ["docker", "build", "--force-rm", "--target", "builder", "-f", "docker/Dockerfile"]
    for key, value in {"BASE_IMAGE": BASE_IMAGE, **build_args}.items():
        args += ["--build-arg", f"{key}={value}"]
    return run([*args, "."], timeout=1200)


def test_cuda_build_does_not_take_the_local_cpu_wheel(cpu_wheel: str) -> None:
    result = build_builder_stage(TORCH_FLAVOUR="cuda", TORCH_VERSION=PUBLIC_VERSION, PIP_NO_INDEX="1")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert f"TORCH_FLAVOUR=cuda: not offering docker/wheels/{cpu_wheel} (a CPU build)" in output, output[-4000:]
    assert f"No matching distribution found for torch=={PUBLIC_VERSION}" in output, output[-4000:]
    assert "Successfully installed" not in output, output[-4000:]


def test_cuda_build_with_a_cpu_torch_stops_at_the_check(cpu_wheel: str) -> None:
    result = build_builder_stage(
        TORCH_FLAVOUR="cuda", TORCH_VERSION=TORCH_VERSION, TORCH_INDEX_URL="https://pypi.org/simple"
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    expected = (
        f"ERROR: TORCH_FLAVOUR=cuda but torch {TORCH_VERSION} is a CPU build (torch.version.cuda is None): "
        "this image would serve on the CPU."
    )
    assert expected in output, output[-4000:]
    assert "requirements.lock" not in output.split(expected)[1], "the build went on past the check"


def test_cpu_build_with_the_cpu_wheel_passes_the_check(cpu_wheel: str) -> None:
    # The arguments compose.cpu.yaml and the suite's .env give the CPU image (tests/e2e/conftest.py), so this
    # reuses that build's layers; the check is then run again on the result, cached or not.
    result = build_builder_stage(
        TORCH_FLAVOUR="cpu", TORCH_VERSION=TORCH_VERSION, TORCH_INDEX_URL="https://pypi.org/simple"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    built = re.search(r"Successfully built ([0-9a-f]+)", output)
    assert built, output[-4000:]
    check = run(["docker", "run", "--rm", built.group(1), "/opt/venv/bin/python", "/tmp/check_torch_flavour.py", "cpu"])
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout == f"torch {TORCH_VERSION}, torch.version.cuda None: fits TORCH_FLAVOUR=cpu\n"
