import os
import sys

import torch

# Let tests import the shared helpers module next to them.
sys.path.insert(0, os.path.dirname(__file__))

# The tests use tiny tensors: one intra-op thread is fastest and keeps runs deterministic.
torch.set_num_threads(1)
