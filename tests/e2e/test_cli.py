"""The command lines as an installed user meets them: console scripts from any folder, bundled
configs and data, --help, and config files that fail."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, repo_pythonpath

from rwkv_jax.config import MOVED, SCHEMA

README = os.path.join(REPO, "README.md")


def _script(name: str) -> list[str]:
    """The console script pip installed beside this Python (the README's install line)."""
    path = shutil.which(name, path=os.path.dirname(sys.executable))
    assert path, f"{name} is not installed beside {sys.executable}: pip install -e '.[dev]'"
    return [path]


def _run(cmd, cwd, timeout=240, **env):
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_field_from_the_schema(tmp_path):
    out = _run(_script("rwkv-train") + ["--help"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--config names a bundled config" in out.stdout and "tiny" in out.stdout
    for group, fields in SCHEMA.items():
        for name, (default, meaning) in fields.items():
            key = f"{group}.{name}" if group else name
            assert re.search(rf"^  {re.escape(key)}={re.escape(repr(default))}\s", out.stdout,
                             re.M), key
            assert meaning in out.stdout
    for old, new in MOVED.items():  # moved fields: listed apart, not as fields of their group
        assert f"  {old} -> {new}" in out.stdout
        assert not re.search(rf"^  {re.escape(old)}=", out.stdout, re.M)


def test_bundled_config_by_name_from_any_folder_trains_on_the_bundled_sample(tmp_path):
    """`rwkv-train --config=tiny` from a folder with nothing in it: the config and the
    Shakespeare sample come from the installed package (the sample read through xz)."""
    out = _run(_script("rwkv-train") + [
        "--config=tiny", "--config.train.steps=2", "--config.model.n_layer=1",
        "--config.model.n_embd=32", "--config.train.batch_size=2",
        "--config.train.max_seq_length=32", "--config.memory.rwkv_chunk_size=32",
        "--config.logging.eval_every=0", "--config.logging.every=1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"Tokenizing .*rwkv_jax/samples/shakespeare/train\.txt\.xz", out.stderr)
    assert "Wrote 4670019 tokens (4670019 bytes of text)" in out.stderr
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "2").is_dir()
    # Clean console: no absl thread ids, no JAX backend chatter, one optimizer line.
    assert "Unable to initialize backend" not in out.stderr
    assert not re.search(r"^[IWE]\d{4} ", out.stderr, re.M)
    assert out.stderr.count("optimizer groups (tensors): ") == 1
    assert "optimizer group " not in out.stderr
    (tmp_path / "prompt.txt.gz").write_bytes(gzip.compress(b"ROMEO:"))
    gen = _run(_script("rwkv-infer") + ["--run_dir", "runs/tiny", "--prompt_file",
                                        "prompt.txt.gz", "--max_new_tokens", "4",
                                        "--num_samples", "2"], cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.count("--- sample ") == 2


@pytest.mark.parametrize("body, line, error", [
    ("def get_config():\n    x = {}\n    return x['nope']\n", 3, "KeyError: 'nope'"),
    ("import not_a_module_xyz\n\ndef get_config():\n    pass\n", 1,
     "ModuleNotFoundError: No module named 'not_a_module_xyz'"),
    ("raise RuntimeError('boom')\n", 1, "RuntimeError: boom"),
    ("def get_config(:\n    pass\n", 1, "SyntaxError: "),
])
def test_a_config_file_that_raises_is_one_line(tmp_path, body, line, error):
    path = tmp_path / "broken.py"
    path.write_text(body)
    out = _run([sys.executable, os.path.join(REPO, "train.py"), f"--config={path}"], cwd=tmp_path,
               PYTHONPATH=repo_pythonpath())
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"config error: {path}, line {line}")
    assert error in out.stderr


def test_a_folder_named_like_a_bundled_config_does_not_hide_it(tmp_path):
    (tmp_path / "tiny").mkdir()  # e.g. a run's output with output_dir=.
    out = _run(_script("rwkv-train") + ["--config=tiny", "--config.train.steps=0"], cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "config error: train.steps=0 is invalid: must be an integer >= 1"


def test_a_missing_config_names_the_bundled_ones(tmp_path):
    out = _run(_script("rwkv-train") + ["--config=tinny"], cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "No such file or directory: 'tinny'" in out.stderr
    assert ("a bundled name: finetune_full, finetune_lora, finetune_state, model_169m, "
            "model_1b5, model_3b_rwkv, tiny") in out.stderr


def test_an_unexpected_failure_leaves_its_traceback_in_crash_log(tmp_path, monkeypatch, capsys):
    """A bug (no error we classify) prints one line naming run_dir/crash.log, which holds the
    whole traceback."""
    from absl import flags

    from rwkv_jax.cli import train as cli
    from rwkv_jax.train import loop

    def broken(run):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(loop, "train", broken)
    monkeypatch.setattr(cli, "setup_logging", lambda: None)  # keep pytest's log handlers
    argv = ["rwkv-train", "--config=tiny", f"--config.output_dir={tmp_path}",
            "--config.train.max_seq_length=16", "--config.memory.rwkv_chunk_size=16"]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
    flags.FLAGS.unparse_flags()
    cli._parse_flags(argv)
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    crash = tmp_path / "tiny" / "crash.log"
    assert f"failed: RuntimeError: a bug in the loop (traceback in {crash})" in err
    assert "Traceback" not in err
    text = crash.read_text()
    assert "Traceback (most recent call last)" in text and "def broken" not in text
    assert 'raise RuntimeError("a bug in the loop")' in text


def test_readme_starts_with_the_commands_ci_runs():
    """The README's first lines are the install and test commands (.ci/run runs exactly
    these) and the main command."""
    text = open(README).read()
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert 'pip install -e ".[dev]"' in first[0] and first[0].split("&& ")[-1] in ci
    assert first[1] in ci.splitlines()
    main = re.findall(r"```bash\n(.*?)```", text, re.S)[1].strip()
    assert main.splitlines()[0] == "python train.py --config=tiny"


def test_readme_library_snippet_runs_as_written(tmp_path, tiny_run):
    """The README's library snippet, run as written in a folder whose runs/tiny is a trained
    run (the main command's; here the session's tiny run)."""
    library = open(README).read().split("## Use as a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", library, re.S).group(1)
    os.makedirs(tmp_path / "runs")
    os.symlink(tiny_run.run_dir, tmp_path / "runs" / "tiny")
    (tmp_path / "snippet.py").write_text(code)
    out = _run([sys.executable, "snippet.py"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()
