"""Every check before a model loads runs, and their problems are reported together: one run tells the user all
that is wrong (a missing control folder AND a bad --ctrl_img), not one problem per 12 GB model load."""

from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

from toolkit.errors import ConfigError, UserError

T = TypeVar("T")


class Problems:
    """Collects the messages of checks that raise UserError (or return a list of problems)."""

    def __init__(self) -> None:
        self.errors: list[UserError] = []

    def run(self, check: Callable[..., T], *args: Any, default: Any = None, **kwargs: Any) -> T:
        """`check(*args, **kwargs)`, or `default` after keeping the UserError it raised."""
        try:
            return check(*args, **kwargs)
        except UserError as exc:
            self.errors.append(exc)
            return default

    def add(self, messages: Iterable[str]) -> None:
        self.errors.extend(ConfigError(message) for message in messages)

    def raise_if_any(self) -> None:
        """One error: raised as it is (its type and text); several: one ConfigError listing every message."""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            listed = "\n".join(f"[{i}] {exc}" for i, exc in enumerate(self.errors, start=1))
            raise ConfigError(f"{len(self.errors)} checks failed before training (nothing was loaded or written); "
                              f"fix them and run again:\n{listed}")



def arch_dataset_problems(arch_cls: Any, datasets: Iterable[Any], cache_text_embeddings: bool = False) -> list[str]:
    """Dataset options the architecture cannot honour, refused by name instead of ignored."""
    datasets = list(datasets)
    problems = []
    if any(d.control_resolution for d in datasets) and not arch_cls.supports_control_resolution:
        problems.append(f"datasets[].control_resolution: model.arch {arch_cls.name} sizes control images itself; "
                        "remove the option")
    if cache_text_embeddings and arch_cls.text_sees_images and any(d.control_dropout_rate for d in datasets):
        # a dropped batch trains on the prompt without its pictures, but a cached prompt entry holds them
        problems.append(f"datasets[].control_dropout_rate: cached prompts hold their control images (model.arch "
                        f"{arch_cls.name}); turn train.cache_text_embeddings or the dropout off")
    return problems


__all__ = ["Problems", "arch_dataset_problems"]
