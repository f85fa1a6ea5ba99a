"""A Ray `worker_process_setup_hook` for tests/test_ray.py: Ray Train workers install run_with_probes' probes and
faults (from KONTEXT_TEST_* variables) before the job runs; every other Ray process stays light.

It wraps jobs.ray_launcher._worker_main in the worker process only: the driver pickles the train function by
reference, so a worker that unpickles it gets the wrapper.
"""

from __future__ import annotations


def install() -> None:
    import jobs.ray_launcher as launcher

    original = launcher._worker_main

    def worker_main(spec: dict) -> None:
        from tests.dist_scripts.run_with_probes import install_from_env

        install_from_env()
        return original(spec)

    launcher._worker_main = worker_main
