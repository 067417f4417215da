"""Build-time guard: the torch installed in the image's venv is the build TORCH_FLAVOUR asks for.

    python check_torch_flavour.py cuda|cpu

Exit 0 with one line naming the torch found; else exit 1 with one line saying what is wrong and what to change.
``torch.version.cuda`` is None exactly for a CPU build of torch (a CUDA build on a host without a GPU still
reports its CUDA version). Standard library apart from torch itself; run by docker/Dockerfile's builder stage.
"""

from __future__ import annotations

import sys
import warnings


def verdict(flavour: str, torch_version: str, cuda_version: str | None) -> str | None:
    """None when ``torch_version`` (whose ``torch.version.cuda`` is ``cuda_version``) fits ``flavour``, else why not."""
    if flavour == "cuda" and cuda_version is None:
        return (
            f"TORCH_FLAVOUR=cuda but torch {torch_version} is a CPU build (torch.version.cuda is None): this image "
            "would serve on the CPU. Remove torch-*+cpu wheels from docker/wheels/, use a bare TORCH_VERSION "
            "(e.g. 2.13.0) and a CUDA index (PyPI or https://download.pytorch.org/whl/cu126), or build the CPU "
            "image (compose.cpu.yaml, TORCH_FLAVOUR=cpu)"
        )
    if flavour == "cpu" and cuda_version is not None:
        return (
            f"TORCH_FLAVOUR=cpu but torch {torch_version} is a CUDA {cuda_version} build (~3 GB of CUDA libraries "
            "the CPU image never loads): take torch from https://download.pytorch.org/whl/cpu (TORCH_INDEX_URL, "
            "CPU_TORCH_INDEX_URL with compose.cpu.yaml) or a +cpu wheel in docker/wheels/ with "
            "TORCH_VERSION=2.13.0+cpu, or build the CUDA image (TORCH_FLAVOUR=cuda)"
        )
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("cuda", "cpu"):
        print(f"usage: {argv[0]} cuda|cpu (TORCH_FLAVOUR, got {argv[1:]})", file=sys.stderr)
        return 1
    # numpy is installed after torch (requirements.lock): keep torch's warning about it out of the one line.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    cuda_version = torch.version.cuda
    problem = verdict(argv[1], torch.__version__, cuda_version)
    if problem is not None:
        print(f"ERROR: {problem}", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, torch.version.cuda {cuda_version}: fits TORCH_FLAVOUR={argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
