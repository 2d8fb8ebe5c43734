"""The pods' main process: torchrun, with an exit status that says whether its workers stopped on the user's error.

torchrun exits 1 whatever ended its workers. A scheduler must tell a user's error (a worker's `barlow` exited 2:
a bad spec, unreachable storage, a corrupt data set), which no retry mends, from a lost node or a crash, which a
retry resumes from the last checkpoint. This runs torchrun's own entry point in this process (its arguments, its
signal handling, the error file TorchX reads: all unchanged) and exits 2 when a failed worker exited 2.

    python -m service.launch.torchrun --nnodes 2 --nproc_per_node 8 ... -m service train env:BARLOW_SPEC
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

from service.errors import USER_ERROR_EXIT


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun(argv)
    except ChildFailedError as error:
        print(error, file=sys.stderr)  # torchrun's report of the failed workers, root cause first
        codes = {failure.exitcode for failure in error.failures.values()}
        return USER_ERROR_EXIT if USER_ERROR_EXIT in codes else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
