"""Secrets never reach a file, and nothing executes code that came from data.

1. A real run with a token in the environment, another secret in a `.env` file that run.py loads, both referenced
   in the config (a sample prompt, a dataset caption default, free-form meta), plus a literal value under a
   secret-looking key: no output file of any kind (logs, resolved config, LoRA files, training states, TensorBoard
   events, samples) holds any of the values.
2. A scan of the source tree (ast, not grep, so comments and strings do not count): no pickle, no torch.load without
   weights_only=True, no yaml.load without a safe loader, no eval/exec, no numpy allow_pickle.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest
import yaml

import run
from tests.helpers import REPO, merge, tiny_config_dict, write_config

ENV_TOKEN = "hf_ENVsecretVALUE0987654321"
DOTENV_KEY = "KONTEXT_TEST_SERVICE_API_KEY"
DOTENV_SECRET = "sk-DOTENVsecret-ABCDEF123456"
LITERAL_SECRET = "literal-secret-in-config-42"


def test_no_secret_reaches_any_output_file(tmp_path, tiny_model_dir, demo_data_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.delenv(DOTENV_KEY, raising=False)
    (tmp_path / ".env").write_text(f"{DOTENV_KEY}={DOTENV_SECRET}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # run.py reads ./.env
    ctrl = demo_data_dir / "sample_control" / "sample_000.png"
    cfg = merge(tiny_config_dict(tmp_path / "out", tiny_model_dir, demo_data_dir),
                {"train.steps": 2, "save.save_every": 1, "sample.sample_every": 2,
                 "sample.prompts": [f"[trigger] invert ${{HF_TOKEN}} --ctrl_img {ctrl}"],
                 "datasets": [{**tiny_config_dict(tmp_path, tiny_model_dir, demo_data_dir)["config"]["process"][0]
                               ["datasets"][0], "default_caption": f"made with ${{{DOTENV_KEY}}}"}]})
    cfg["meta"].update(hub_token="${HF_TOKEN}", note=f"key ${{{DOTENV_KEY}}}", wandb={"api_key": LITERAL_SECRET})
    log_file = tmp_path / "run.log"
    try:
        assert run.main([str(write_config(tmp_path / "secret.yaml", cfg)), "--log", str(log_file)]) == 0
        logging.getLogger("probe").warning("late leak attempt %s %s", ENV_TOKEN, DOTENV_SECRET)
    finally:
        os.environ.pop(DOTENV_KEY, None)

    out = tmp_path / "out" / "tiny"
    files = [p for p in out.rglob("*") if p.is_file()] + [log_file]
    kinds = {p.suffix for p in files} | {p.name for p in files if p.parent.name.isdigit()}
    # Every kind of output is there to be searched: config, LoRAs, PNG samples, state files, TensorBoard events.
    assert {".yaml", ".safetensors", ".png", ".pt", ".json", "COMPLETE", ".log"} <= kinds, kinds
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    leaks = [(p, secret) for p in files for secret in (ENV_TOKEN, DOTENV_SECRET, LITERAL_SECRET)
             if secret.encode() in p.read_bytes()]
    assert leaks == []
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["meta"]["hub_token"] == "***" and saved["meta"]["wandb"]["api_key"] == "***"
    assert "late leak attempt *** ***" in log_file.read_text(encoding="utf-8")


# -- nothing executes code from data -------------------------------------------------------------------------------
SOURCE_DIRS = ("run.py", "jobs", "toolkit", "extensions", "tools", "tests")
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "_StrictYamlLoader"}
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "joblib"}


def _python_files() -> list[Path]:
    files = []
    for entry in SOURCE_DIRS:
        path = REPO / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _problems(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any((n or "").split(".")[0] in PICKLING_MODULES for n in names):
                found.append((node.lineno, "imports a pickle-like module"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("eval", "exec"):
            found.append((node.lineno, f"{name}()"))
        elif name.split(".")[0] in PICKLING_MODULES:
            found.append((node.lineno, name))
        elif name == "torch.load":
            weights_only = _keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found.append((node.lineno, name))
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                found.append((node.lineno, f"{name} without a safe loader"))
        elif name in ("np.load", "numpy.load"):
            allow = _keyword(node, "allow_pickle")
            if not (allow is None or (isinstance(allow, ast.Constant) and allow.value is False)):
                found.append((node.lineno, "numpy.load with allow_pickle"))
    return found


def test_source_tree_never_unpickles_evaluates_or_unsafely_parses():
    files = _python_files()
    assert len(files) > 30
    problems = [f"{path.relative_to(REPO)}:{line}: {what}" for path in files
                for line, what in _problems(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))]
    assert problems == []


def test_the_config_loader_is_a_safe_loader():
    from toolkit.config import loader

    assert issubclass(loader._StrictYamlLoader, yaml.SafeLoader)
    with pytest.raises(Exception, match="could not determine a constructor"):
        loader._parse_yaml("x: !!python/object/apply:os.system ['echo pwned']\n", Path("evil.yaml"))


def test_the_scan_finds_what_it_looks_for():
    """The scanner itself: each forbidden pattern is caught, the safe spellings are not."""
    bad = ("import pickle\nfrom dill import loads\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
           "yaml.load(t)\nyaml.load(t, Loader=yaml.Loader)\nyaml.full_load(t)\neval('1')\nexec('x=1')\n"
           "np.load(f, allow_pickle=True)\nmarshal.loads(b)\n")
    assert [line for line, _ in _problems(ast.parse(bad))] == list(range(1, 12))
    good = ("torch.load(f, weights_only=True)\nyaml.load(t, Loader=yaml.SafeLoader)\nyaml.safe_load(t)\n"
            "model.eval()\nnp.load(f)\nre.compile('x')\n")
    assert _problems(ast.parse(good)) == []


def test_a_state_file_with_a_pickled_object_is_refused(tmp_path):
    """Training states are read with weights_only=True: a file that would run code on unpickling is rejected."""
    import io

    import torch

    from toolkit.state.train_state import StateError, load_state

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    state = tmp_path / "state" / "000000001"
    state.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save({"payload": Evil()}, buf)
    (state / "optimizer.pt").write_bytes(buf.getvalue())
    (state / "trainer.json").write_text('{"step": 1}', encoding="utf-8")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(state / "lora.safetensors"))
    torch.save({}, state / "scheduler.pt")
    with pytest.raises(StateError, match="cannot be loaded"):
        load_state(state, rank=0)
    assert not (tmp_path / "pwned").exists()
