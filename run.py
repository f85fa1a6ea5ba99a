#!/usr/bin/env python
"""Run one or more training configs: `python run.py CONFIG [CONFIG ...] [--recover] [--name NAME] [--log FILE]`.

Subcommands (jobs/commands.py): `python run.py generate ...`, `python run.py compare RUN_FOLDER`,
`python run.py convert-lora IN OUT --to comfy|diffusers`, `python run.py push RUN_FOLDER`,
`python run.py plan CONFIG [--gpu-memory GiB]`; each has its own --help.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

if __name__ == "__main__":  # before any dependency import: `python run.py` from outside .venv re-runs inside it
    from toolkit.venv import use_repo_venv

    use_repo_venv(REPO)

from dotenv import load_dotenv  # noqa: E402

from toolkit.errors import UserError  # noqa: E402
from toolkit.redact import install_log_redaction  # noqa: E402
from toolkit.train.signals import TrainingInterrupted  # noqa: E402
from toolkit.train.nonfinite import TrainingDiverged  # noqa: E402

log = logging.getLogger("run")
SUBCOMMANDS = ("generate", "compare", "convert-lora", "push", "plan")  # checked before CONFIG names, so they win over config files


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train FLUX Kontext LoRAs from ai-toolkit style configs.",
                                     epilog="other commands: " + ", ".join(SUBCOMMANDS) + " (run.py COMMAND --help)")
    parser.add_argument("config_file_list", nargs="*", metavar="CONFIG",
                        help="config files, as paths or names under config/ (.yaml, .yml, .json tried in turn)")
    parser.add_argument("-r", "--recover", action="store_true",
                        help="go on with the next config after a failure; exit non-zero at the end if any failed")
    parser.add_argument("-n", "--name", default=None, help="replaces config.name and every [name] in the config")
    parser.add_argument("-l", "--log", default=None, help="also write the log to this file")
    parser.add_argument("--fresh", action="store_true",
                        help="start over in a new run folder (<name>_v2, _v3...) instead of resuming the existing one")
    parser.add_argument("--help-config", action="store_true", help="print every config key with its meaning")
    parser.add_argument("--dry-run", action="store_true",
                        help="caption jobs: list what would be captioned, load no model, write nothing")
    ray = parser.add_argument_group("Ray cluster (`--launcher ray`, needs `pip install -r requirements-ray.txt`)")
    ray.add_argument("--launcher", choices=("local", "ray"), default="local",
                     help="local: this process (or the ones `accelerate launch` started); ray: Ray Train workers")
    ray.add_argument("--num-workers", type=int, default=None, help="Ray workers: one per GPU with --use-gpu")
    ray.add_argument("--address", default=None, help="an existing Ray cluster: auto or HOST:PORT (default: local)")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per Ray worker (default: CPU workers, gloo)")
    ray.add_argument("--storage-path", default=None,
                     help="where Ray keeps checkpoints; a folder every node sees, or a URI (default: "
                          "<training_folder>/ray_checkpoints)")
    ray.add_argument("--max-failures", type=int, default=0,
                     help="restart the Ray workers from the newest checkpoint up to this many times (default 0)")
    args = parser.parse_args(argv)
    if not args.config_file_list and not args.help_config:
        parser.error("give at least one CONFIG")
    ray_only = [flag for flag, value in (("--num-workers", args.num_workers), ("--address", args.address),
                                          ("--use-gpu", args.use_gpu), ("--storage-path", args.storage_path),
                                          ("--max-failures", args.max_failures))
                if value not in (None, False, 0)]
    if args.launcher != "ray" and ray_only:
        parser.error(f"{', '.join(ray_only)} only with --launcher ray")
    if args.launcher == "ray" and args.num_workers is None:
        parser.error("--launcher ray needs --num-workers N")
    return args


def run_job(job, args) -> None:
    """Run a loaded job here, or on Ray workers."""
    if args.launcher != "ray":
        job.run()
        return
    from jobs.ray_launcher import RayOptions, launch

    launch(job, RayOptions(num_workers=args.num_workers, use_gpu=args.use_gpu, address=args.address,
                           storage_path=args.storage_path, max_failures=args.max_failures), fresh=args.fresh)


def setup_logging(log_file: str | None) -> None:
    # Only rank 0 of a multi-process run talks at INFO; other ranks report warnings and errors.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    from toolkit.train.metrics import TqdmLogHandler  # lines above the progress bar, never glued onto it

    handlers = [TqdmLogHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_log_redaction()


def quiet_libraries() -> None:
    """Library chatter (per-component loading bars, optional-backend notices) drowns the training log. Called only
    when real work starts: importing diffusers takes seconds, and --help must not wait for it."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _naming(config: str, exc: Exception) -> str:
    """The error prefixed with its config file, once: loader messages already start with the file's name."""
    message = str(exc)
    head = message.split(":", 1)[0]
    return message if head and (head == config or Path(config).name == Path(head).name) else f"{config}: {message}"


def run_subcommand(name: str, argv: list[str]) -> int:
    load_dotenv(REPO / ".env", override=False)
    load_dotenv(Path.cwd() / ".env", override=False)
    setup_logging(None)
    if not {"-h", "--help"} & set(argv):
        quiet_libraries()
    from jobs.commands import COMMANDS

    try:
        return COMMANDS[name](argv)
    except UserError as exc:
        log.error("%s: %s", name, exc)
        return 2
    except Exception:
        log.exception("%s failed", name)
        return 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv[0], argv[1:])
    args = parse_args(argv)
    # .env holds HF_TOKEN for gated models; values already in the environment win.
    load_dotenv(REPO / ".env", override=False)
    load_dotenv(Path.cwd() / ".env", override=False)
    setup_logging(args.log)
    if args.help_config:
        from toolkit.config.loader import config_help

        sys.stdout.write(config_help() + "\n")
        return 0

    quiet_libraries()
    from jobs import get_job

    status = 0
    for config in args.config_file_list:
        try:
            job = get_job(config, name_override=args.name, fresh=args.fresh, dry_run=args.dry_run)
            run_job(job, args)
            continue
        except TrainingInterrupted as exc:  # a stop signal: stop everything, whatever --recover says
            log.error("%s: %s", config, exc)
            return exc.exit_code
        except TrainingDiverged as exc:  # NaN/Inf: a clear message, not a traceback; the good checkpoints are kept
            log.error("%s: %s", config, exc)
            status = exc.exit_code
        except UserError as exc:
            log.error("%s", _naming(config, exc))
            status = status or 2
        except Exception:
            log.exception("%s: the job failed", config)
            status = 1
        if not args.recover:
            return status
    return status


if __name__ == "__main__":
    sys.exit(main())
