import os
import sys

# Keep the CPU tests deterministic and light on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(__file__))
