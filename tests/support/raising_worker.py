"""A torchrun worker whose training fails with an error nobody foresaw, through the real `python -m service` entry
point: what a crashing worker leaves in torchrun's error file (tests/test_logs.py).

    torchrun --standalone --nproc-per-node 2 tests/support/raising_worker.py train specs/digits.yaml --set run.output=X
"""

import sys

import service.train.trainer
from service.__main__ import main


def _train(*args, **kwargs):
    raise RuntimeError("boom at step 3")


service.train.trainer._train = _train
sys.exit(main())
