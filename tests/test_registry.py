"""Registry and the model cache: an interrupted conversion is never used."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateskip_core import REGISTRY, GateSkipError, cache_root, load_model
from gateskip_core.backbone import registry


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GATESKIP_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert REGISTRY["smollm2-135m-instruct"].cache_dir == tmp_path / "models" / "smollm2-135m-instruct"


def test_interrupted_conversion_leaves_no_usable_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GATESKIP_CACHE", str(tmp_path))

    def locate_then_die(work_dir: Path) -> Path:
        (work_dir / "model").mkdir()
        (work_dir / "model" / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the conversion

    entry = registry.RegistryEntry("fake", "fake", "test", locate_gguf=locate_then_die)
    monkeypatch.setitem(registry.REGISTRY, "fake", entry)
    with pytest.raises(KeyboardInterrupt):
        load_model("fake")
    assert not entry.cache_dir.exists() and not entry.is_cached()
    assert list((tmp_path / "models").iterdir()) == []  # the partial directory is cleaned up


def test_processes_finding_the_cache_missing_at_once_convert_it_once(monkeypatch, tmp_path):
    """Two loaders start on a fresh cache (two commands, two test workers): the second waits for the
    first's conversion and loads it, instead of converting again and replacing it under a reader."""
    import threading
    import time

    monkeypatch.setenv("GATESKIP_CACHE", str(tmp_path))
    entry = registry.RegistryEntry("fake", "fake", "test", locate_gguf=lambda work: work)
    conversions = []

    def slow_conversion(entry, progress):
        conversions.append(threading.get_ident())
        time.sleep(0.5)
        entry.cache_dir.mkdir(parents=True)
        (entry.cache_dir / registry._COMPLETE_MARKER).write_text("{}")

    monkeypatch.setattr(registry, "_convert_gguf", slow_conversion)
    loaders = [threading.Thread(target=registry._ensure_cached, args=(entry, print)) for _ in range(2)]
    for t in loaders:
        t.start()
    for t in loaders:
        t.join()
    assert len(conversions) == 1 and entry.is_cached()


def test_directory_without_completion_marker_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("GATESKIP_CACHE", str(tmp_path))
    entry = REGISTRY["smollm2-135m-instruct"]
    entry.cache_dir.mkdir(parents=True)
    (entry.cache_dir / "config.json").write_text("{}")
    assert not entry.is_cached()


def test_local_checkpoint_directory_loads(tmp_path):
    tiny = load_model("tiny-gemma3")
    tiny.backbone.save_pretrained(tmp_path / "ckpt")
    tiny.tokenizer.save_pretrained(tmp_path / "ckpt")
    again = load_model(str(tmp_path / "ckpt"))
    assert again.spec.n_layers == 4 and again.spec.model_type == "gemma3_text"


@pytest.mark.parametrize(
    "name, message", [("nope", "unknown model"), ("./missing-dir", "model folder .*missing-dir does not exist")]
)
def test_unknown_models(name, message):
    with pytest.raises(GateSkipError, match=message):
        load_model(name)


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(
        BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=50, is_decoder=True)
    )
    model.save_pretrained(tmp_path / "bert")
    load_model("tiny-llama").tokenizer.save_pretrained(tmp_path / "bert")
    with pytest.raises(GateSkipError, match="unsupported architecture 'bert'; supported: llama, mistral"):
        load_model(str(tmp_path / "bert"))
