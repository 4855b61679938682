"""``paretoq qat`` with an injected failure, run under torchrun by tests/test_distributed.py.

PARETOQ_TEST_FAULT = "step:<rank>:<n>": that rank's process dies (exit 3) at its n-th optimizer step;
                     "hang:<rank>:<n>": that rank sleeps for 10 minutes at its n-th step;
                     "save:<rank>:<n>": that rank dies (exit 4) inside its n-th checkpoint save,
                     after writing part of a shard file;
                     "diskfull:<rank>:<n>": that rank's n-th checkpoint write fails with ENOSPC
                     (an exception inside DCP's writer, which DCP reports to every rank).
"""

from __future__ import annotations

import errno
import os
import sys

import torch.distributed.checkpoint as dcp

from paretoq_ao.workflow import train as recipe  # run_qat calls train._one_step
from paretoq_ao.cli import main


def _install(spec: str) -> None:
    kind, rank, n = spec.split(":")
    if int(os.environ["RANK"]) != int(rank):
        return
    count = {"n": 0}
    if kind in ("step", "hang"):
        import time

        real = recipe._one_step

        def one_step(*args, **kwargs):
            count["n"] += 1
            if count["n"] == int(n):
                if kind == "step":
                    os._exit(3)
                time.sleep(600)
            return real(*args, **kwargs)

        recipe._one_step = one_step
    elif kind == "save":
        real_save = dcp.save

        def save(state, *args, checkpoint_id=None, **kwargs):
            count["n"] += 1
            if count["n"] == int(n):
                os.makedirs(checkpoint_id, exist_ok=True)
                with open(os.path.join(checkpoint_id, f"__{os.environ['RANK']}_0.distcp"), "wb") as f:
                    f.write(b"\0" * 1000)  # a torn shard
                os._exit(4)
            return real_save(state, *args, checkpoint_id=checkpoint_id, **kwargs)

        dcp.save = save
    elif kind == "diskfull":
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        real_write = FileSystemWriter.write_data

        def write_data(self, *args, **kwargs):
            count["n"] += 1
            if count["n"] == int(n):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(self, *args, **kwargs)

        FileSystemWriter.write_data = write_data
    else:
        raise SystemExit(f"bad PARETOQ_TEST_FAULT {spec!r}")


if __name__ == "__main__":
    _install(os.environ["PARETOQ_TEST_FAULT"])
    sys.exit(main(sys.argv[1:]))
