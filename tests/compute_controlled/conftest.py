"""The study's modules live in examples/compute_controlled/ (a script folder, not a package)."""

import sys
from pathlib import Path

STUDY_DIR = Path(__file__).resolve().parents[2] / "examples" / "compute_controlled"
if str(STUDY_DIR) not in sys.path:
    sys.path.insert(0, str(STUDY_DIR))
