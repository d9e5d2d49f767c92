"""The package version without importing torch (read from installed metadata, else from the source tree)."""
import re
from importlib import metadata
from pathlib import Path


def _read_version() -> str:
    try:
        return metadata.version("fastvmt")
    except metadata.PackageNotFoundError:  # running from a source tree (e.g. the GPU machine's PYTHONPATH)
        source = (Path(__file__).resolve().parent.parent / "fastvmt_kernels" / "__init__.py").read_text()
        return re.search(r'__version__ = "([^"]+)"', source).group(1)


__version__ = _read_version()
