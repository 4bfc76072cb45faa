#!/usr/bin/env python
"""Time our CPU libraries against torch (eager and torch.compile) in one run.

Same as `mlc-vision bench`; all options pass through, e.g.

    python scripts/bench_vs_torch.py --model clip-vit-base-patch16 --batch 1,8 --runs 10
"""

import sys

from mlc_vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
