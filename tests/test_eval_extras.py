"""`gateskip eval --chat-template`, lm-eval's own command line with the `gateskip` model
(`python -m analysis.evaluation`), and what a run of many settings does once (ShortGPT settings
removing the same layers, lm-eval's environment report), on tiny models and the shipped offline tasks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from analysis.evaluation.lm import GateSkipLM  # noqa: E402
from analysis.evaluation.task_loading import load_tasks  # noqa: E402
from gateskip.cli import main  # noqa: E402
from gateskip_core import load_model  # noqa: E402
from tests.conftest import ROOT_DIR, spread_gates  # noqa: E402

TASK = "gateskip_legal_nextsent"


def _scores(lm, tasks, chat: bool) -> tuple[np.ndarray, list[str]]:
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[tasks.tasks[TASK]],
        task_manager=tasks.manager,
        limit=2,
        log_samples=True,
        apply_chat_template=chat,
    )
    samples = out["samples"][TASK]
    scores = np.array([float(r[0][0]) for s in samples for r in s["resps"]])
    return scores, [s["arguments"][0][0] for s in samples]


def test_chat_template_requests_are_hfs_with_the_models_own_template():
    """With the chat template, budget 0 scores every choice as lm-eval's `hf` does, on contexts
    rendered by the model's own template (its role markers), and differently from plain contexts."""
    from lm_eval.models.huggingface import HFLM

    tiny = spread_gates(load_model("tiny-llama"))
    tasks = load_tasks([TASK])
    ours, contexts = _scores(GateSkipLM(tiny, skip=0.0, adapter_scope="skipped", batch_size=3), tasks, chat=True)
    hf = HFLM(pretrained=tiny.original, tokenizer=tiny.tokenizer, batch_size=3, add_bos_token=True, device="cpu")
    theirs, _ = _scores(hf, tasks, chat=True)
    plain, plain_contexts = _scores(GateSkipLM(tiny, skip=0.0, adapter_scope="skipped", batch_size=3), tasks, False)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert all(c.startswith("<|user|>") for c in contexts) and not any("<|user|>" in c for c in plain_contexts)
    assert not np.allclose(ours, plain, atol=1e-3)
    # `gateskip eval --chat-template` reaches lm-eval: its JSON records the model's own template
    from analysis.evaluation.run import evaluate_tasks

    for chat, template in ((True, tiny.tokenizer.chat_template), (False, None)):
        run = evaluate_tasks(tiny, tasks, [0.0], ["gateskip"], limit=1, chat_template=chat)
        assert run.runs[0]["chat_template"] == template


def test_chat_template_flag_needs_a_template(tmp_path, capsys):
    """A checkpoint whose tokenizer has no chat template: one line, exit 2, nothing written."""
    from gateskip_core.backbone.tiny_models import build_tiny_model

    model, tokenizer = build_tiny_model("llama")
    tokenizer.chat_template = None
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "r.csv"
    capsys.readouterr()  # the checkpoint's own writing progress
    args = ["eval", "--model", str(tmp_path / "ckpt"), "--gates", "untrained", "--tasks", TASK]
    status = main([*args, "--chat-template", "--limit", "1", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gateskip")]
    assert status == 2 and len(err) == 1 and "has no chat template" in err[0], err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_lm_evals_own_command_line_runs_the_gateskip_model(tmp_path):
    """`python -m analysis.evaluation` is `lm_eval` with our model registered and the shipped tasks found."""
    argv = [sys.executable, "-m", "analysis.evaluation", "--model", "gateskip", "--tasks", TASK, "--limit", "2"]
    argv += ["--model_args", "pretrained=tiny-llama,gates=untrained,skip=0.25,adapter_scope=all"]
    done = subprocess.run(argv, cwd=ROOT_DIR, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gateskip ({'pretrained': 'tiny-llama'" in done.stdout and f"|{TASK}|" in done.stdout.replace(" ", "")


def test_settings_removing_the_same_layers_run_once_and_the_environment_is_collected_once(monkeypatch):
    """At budget 0 both ShortGPT variants remove no layer: one lm-eval run serves both (same rows);
    lm-eval's environment report (seconds of subprocesses) is collected once for every run."""
    import lm_eval.evaluator
    import lm_eval.loggers.utils

    from analysis.evaluation import run as eval_run

    runs, reports = [], []
    real_run, real_report = eval_run._run_one, lm_eval.loggers.utils.add_env_info
    monkeypatch.setattr(eval_run, "_run_one", lambda *a, **k: runs.append(a[0].label) or real_run(*a, **k))
    monkeypatch.setattr(lm_eval.loggers.utils, "add_env_info", lambda s: reports.append(1) or real_report(s))
    eval_run._environment.cache_clear()
    tiny = spread_gates(load_model("tiny-llama"))
    methods = ["gateskip", "shortgpt", "shortgpt-calibration"]
    table = eval_run.evaluate_tasks(tiny, load_tasks([TASK]), [0.0], methods, limit=2).table
    assert runs == ["quantile b=0", "removed layers none"] and len(reports) == 1
    rows = table[table["method"].str.startswith("shortgpt")].set_index(["method", "metric"])["value"]
    assert rows["shortgpt"].equals(rows["shortgpt-calibration"])
    assert lm_eval.evaluator.add_env_info is real_report  # lm-eval's own function is back after each run
