"""Install torch from one index only, then refuse a build other than the one that index names.

``python install_torch.py INDEX_URL VERSION`` (the Dockerfiles run it before the app's own install).
With ``--extra-index-url`` pip took the highest version over PyPI and the CUDA index together, so
a CUDA index lacking the pinned version silently gave PyPI's build (another CUDA, or none); here
pip sees the one index (a missing build fails the image build), and the installed torch's CUDA
version must be the one the index's name claims (``.../cu128`` -> 12.8, ``.../cpu`` -> none).
"""

from __future__ import annotations

import re
import subprocess
import sys


def expected_cuda(index_url: str) -> str | None:
    """``"12.8"`` for ``.../whl/cu128``, None for ``.../whl/cpu``; ValueError for another index."""
    m = re.search(r"/(cpu|cu(\d{2,3}))/?$", index_url)
    if m is None:
        raise ValueError(f"{index_url}: expected a PyTorch wheel index ending in /cpu or /cuXYZ (e.g. /cu128)")
    digits = m.group(2)
    return None if digits is None else f"{digits[:-1]}.{digits[-1]}"


def problem(index_url: str, torch_version: str, torch_cuda: str | None) -> str | None:
    """What is wrong with the installed build for ``index_url``, or None."""
    want = expected_cuda(index_url)
    if want == torch_cuda:
        return None
    got = f"CUDA {torch_cuda}" if torch_cuda else "a CPU build"
    return f"torch {torch_version} is {got}, but {index_url} is {'the CPU index' if want is None else 'CUDA ' + want}"


def main(argv: list[str]) -> int:
    index_url, version = argv
    expected_cuda(index_url)  # a wrong URL fails before any download
    pip = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--index-url", index_url, f"torch=={version}"]
    subprocess.run(pip, check=True)
    probe = "import torch; print(torch.__version__); print(torch.version.cuda or '')"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split("\n")
    found = problem(index_url, out[0], out[1] or None)
    if found:
        print(f"install_torch: {found}", file=sys.stderr)
        return 1
    print(f"install_torch: torch {out[0]}, {'CUDA ' + out[1] if out[1] else 'CPU build'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
