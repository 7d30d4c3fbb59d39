"""sweep: compare learning-rate schedules on real PyTorch training."""

from pathlib import Path

__version__ = "0.1.0"

# The config tree lives at the repository's top level (conf/) and is shipped inside the package
# through the src/sweep/conf symlink, so `python -m sweep` finds it from any working directory.
CONF_DIR = Path(__file__).resolve().parent / "conf"
