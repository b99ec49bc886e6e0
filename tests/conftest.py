import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RSD_BENCH_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (table_lm, stats)
torch.set_num_threads(1)  # tiny tensors: threads only add overhead
