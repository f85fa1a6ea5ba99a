"""`python -m tools.launch_check CONFIG`: the launcher's pre-flight. Prints the resolved config path on stdout.

Strict-loads the config once (so a typo is reported once, not by every rank) and warns when a process does not set
train.distributed_training: true. Exit 2 with the problem on stderr when the config is unusable.
"""

from __future__ import annotations

import sys

from toolkit.config.loader import find_config_file, load_job_config
from toolkit.errors import UserError


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m tools.launch_check CONFIG\n")
        return 2
    try:
        path = find_config_file(argv[0])
        job = load_job_config(path)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    for i, process in enumerate(job.config.process):
        train = getattr(process, "train", None)  # generate processes have no train section
        if train is not None and not train.distributed_training:
            sys.stderr.write(f"warning: {path}: config.process[{i}].train.distributed_training is not true; "
                             "a multi-process launch of it will stop with an error\n")
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
