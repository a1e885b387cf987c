import os
import sys
from pathlib import Path

import torch

# Stage scripts live at the repository root; tests import them directly.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))
