import sys
from pathlib import Path

import torch

# Stage scripts live at the repository root; tests import them directly.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Tiny test tensors run fastest on one thread, and two threads thrash when anything else is running.
torch.set_num_threads(1)
