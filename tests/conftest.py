import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch

torch.set_num_threads(1)  # tiny models: threads only add contention (and CI machines share their cores)
