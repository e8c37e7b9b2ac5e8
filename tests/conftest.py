import os
import sys
from pathlib import Path

# one thread per process: CI has 2 cores and the distributed tests run 2 ranks
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).parent))
