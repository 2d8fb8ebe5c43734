"""`python -m service`: the `barlow` command as the program torchrun starts in each worker.

torchelastic's `record` writes an exception that ends a worker, with its traceback, to the error file torchrun
gives the worker (TORCHELASTIC_ERROR_FILE): torchrun prints it as the failure's root cause and TorchX's status
carries it. Outside torchrun it only turns on the fault handler.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from service import cli


@record
def main() -> int | None:
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
