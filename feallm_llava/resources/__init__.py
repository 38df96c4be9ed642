"""Data shipped inside the package, so an installed wheel works from any directory.

    templates/        question templates of the three instruction types (JSON)
    serve_examples/   example faces for upstream's chat page: a synthetic FACS face
                      (happiness prototype) and scikit-image's astronaut photo (NASA,
                      public domain), both 336 px
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_path(*parts: str) -> Path:
    """The file or folder `parts` under the package's resources."""
    return Path(str(files(__name__).joinpath(*parts)))
