"""What the dashboard asks of the library, without any Streamlit code.

- `ModelHub`: each backbone is loaded once per process and shared by every
  browser session; sessions get their own `GatedModel.view` with their gates.
- `exact`: one exact run (the gated model with the skips applied) and the
  prompt's quality against the ungated model (`prompt_quality`).
- `estimate`: re-threshold captured gate values (no model call).
- `compare_decisions`: where estimate and exact decisions differ.
- `DataDir`: the Corpus view's datasets (listed, opened by name, collected from uploads or a
  pydoc sample, under a size quota).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gateskip_core import GatedModel, GateSkipError, Trace, load_gates, load_model
from gateskip_core.forward.generation import SkipRates
from gateskip_core.model import shipped_gate_specs
from gateskip_core.reference import kl_to_reference, log_probs, top1_agreement

MAX_PROMPT_TOKENS = 512
EXAMPLE_PROMPTS = {
    "Python prose": "A list comprehension consists of brackets containing an expression followed by a for clause, "
    "then zero or more for or if clauses. The result is a new list.",
    "Story": "Once upon a time, in a small village by the sea, there lived an old fisherman who told stories "
    "to anyone who would listen.",
    "Arithmetic": "Question: Tom has 3 apples and buys 5 more. How many apples does he have? Answer: 8.",
    "Chat: explain": "Explain in two sentences why the sky is blue.",
}


class ModelHub:
    """Process-wide model cache; loading is serialised, use is concurrent. Every model it loads lives
    on `device` in `dtype` (`gateskip dashboard --device/--dtype`)."""

    def __init__(self, device: str = "cpu", dtype: str = "float32") -> None:
        self._models: dict[tuple[str, str], GatedModel] = {}
        self._lock = threading.Lock()
        self.device, self.dtype = device, dtype

    def base(self, name: str, progress=lambda msg: None, weights: str = "fp32") -> GatedModel:
        """The backbone `name` with its projections in `weights` (fp32, int8, int4: one copy each)."""
        with self._lock:
            if (name, weights) not in self._models:
                self._models[(name, weights)] = load_model(
                    name, progress=progress, device=self.device, dtype=self.dtype, weights=weights
                )
            return self._models[(name, weights)]

    def view(self, name: str, gates: str, uploaded: bytes | None = None, weights: str = "fp32") -> GatedModel:
        """The shared backbone with the chosen gates attached (cache the result per choice)."""
        base = self.base(name, weights=weights)
        view = base.view()
        if gates == "upload":
            if uploaded is None:
                raise GateSkipError("choose a .safetensors gate file to upload")
            ckpt = gates_from_bytes(uploaded, base)
            view.attach_gates(ckpt.gates, "uploaded", ckpt)
        else:
            view.load_gates(gates)
        return view


def gates_from_bytes(data: bytes, model: GatedModel):
    """Validate an uploaded gate checkpoint against `model` (one-line GateSkipError on any problem)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "uploaded.safetensors"
        path.write_bytes(data)
        return load_gates(path, model.spec.fingerprint())


def gate_choices(model_name: str) -> list[str]:
    """Gate options for a model: shipped ones first when they exist."""
    return shipped_gate_specs(model_name) + ["untrained", "untrained:scalar", "none", "upload"]


@dataclass(frozen=True)
class Settings:
    """Everything the sidebar chose: the model view and the skip settings of every call."""

    model_name: str
    view: GatedModel
    mode: str  # estimate | exact
    budget: float | list[float]
    branches: str
    policy: str
    protect_bos: bool
    seed: int
    allocation: str
    adapter_scope: str = "auto"  # auto | all | skipped

    def skip_args(self, view: GatedModel | None = None) -> dict:
        """The `SkipArgs` of a call on `view` (default: the sidebar's view)."""
        view = view or self.view
        return dict(
            skip=self.budget,
            policy=policy_for(view, self.policy),
            branches=self.branches,
            protect_bos=self.protect_bos,
            seed=self.seed,
            allocation=self.allocation if view.gates is not None else "uniform",
            adapter_scope=self.adapter_scope,
        )


def settings_for(settings: Settings, model_name: str, view: GatedModel) -> Settings:
    """The sidebar's settings for another model's view: per-layer budgets become their mean (the
    other model has its own layers), everything else carries over."""
    import dataclasses

    budget = settings.budget
    if not isinstance(budget, (int, float)) and model_name != settings.model_name:
        budget = float(np.mean(budget))
    return dataclasses.replace(settings, model_name=model_name, view=view, budget=budget)


def policy_for(view: GatedModel, policy: str) -> str:
    """The one fallback rule: without gates every gate counts as 1.0, so only random skipping can choose."""
    return policy if view.gates is not None else "random"


@dataclass
class PromptQuality:
    kl_to_full: float  # mean over positions of KL(ungated || skipped)
    top1_agreement: float


def prompt_quality(model: GatedModel, batch, gated_logits: torch.Tensor) -> PromptQuality:
    """KL and top-1 agreement of the gated run's logits against the ungated model on the same tokens."""
    full = model.view().forward(batch.input_ids, batch.attention_mask, model.make_plan(0.0))
    lp_full, lp = log_probs(full.logits[0]), log_probs(gated_logits[0])
    kl = float(kl_to_reference(lp_full, lp).mean())
    agree = float(top1_agreement(lp_full, lp).mean())
    return PromptQuality(kl, agree)


@dataclass
class Continuations:
    ungated: list[str]
    skipping: list[str]
    first_divergence: int | None  # index of the first differing token, None if identical
    skip_rates: SkipRates  # of the skipping run: budget, prompt and generated tokens' rates

    def caption(self) -> str:
        """Where the continuations part, and the rates the skipping run reached next to its budget."""
        rates = self.skip_rates
        divergence = (
            "identical"
            if self.first_divergence is None
            else f"first divergent token (marked ⟦ ⟧): #{self.first_divergence}"
        )
        thresholds = f" (thresholds: {rates.thresholds})" if rates.thresholds else ""
        return (
            f"{divergence}; skipped: prompt {rates.prompt:.1%}, generated {rates.generated:.1%} "
            f"of eligible branches at budget {rates.budget:.1%}{thresholds}"
        )


def continuations(model: GatedModel, text: str, chat: bool, n_new: int, **skip_kwargs) -> Continuations:
    plain = model.view().generate(text, max_new_tokens=n_new, skip=0.0, chat=chat)
    skipping = model.generate(text, max_new_tokens=n_new, chat=chat, **skip_kwargs)
    a = plain.trace.extra["generated_token_ids"][0]
    b = skipping.trace.extra["generated_token_ids"][0]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return Continuations(model.token_strings(a), model.token_strings(b), first, skipping.skip_rates())


@dataclass
class DraftedContinuation:
    """The original's greedy continuation as self-speculative decoding produced it: per token, whether
    it was a drafted token the original accepted, its correction of a drafted token (and which), or
    its own token with no draft at that position."""

    tokens: list[str]
    sources: list[str]  # accepted | corrected | verifier (`gateskip_core.forward.speculative`)
    rejected: list[str | None]  # the draft's token where the original corrected it
    drafted: int
    accepted: int
    draft_skip_rate: float
    policy: str

    def marked(self) -> str:
        """The continuation with each rejected draft shown as ⟪draft→original⟫."""
        return "".join(tok if draft is None else f"⟪{draft}→{tok}⟫" for tok, draft in zip(self.tokens, self.rejected))

    def caption(self) -> str:
        n_rejected = sum(d is not None for d in self.rejected)
        rate = self.accepted / self.drafted if self.drafted else 0.0
        return (
            f"the original accepted {self.accepted} of {self.drafted} drafted tokens ({rate:.0%}); "
            f"⟪draft→original⟫ marks the {n_rejected} it rejected: where skipping changed the next token. "
            f"The draft skipped {self.draft_skip_rate:.0%} of its branches ({self.policy} policy)."
        )


def drafted_continuation(
    model: GatedModel, text: str, chat: bool, n_new: int, draft_tokens: int, **skip_kwargs
) -> DraftedContinuation:
    """Self-speculative decoding with the sidebar's skip settings as the draft's (a quantile policy
    becomes calibrated: the draft decides token by token)."""
    args = dict(skip_kwargs)
    draft_skip = args.pop("skip")
    if args.get("policy") == "quantile":
        args["policy"] = "calibrated"
    gen = model.generate(
        text, max_new_tokens=n_new, chat=chat, draft_skip=draft_skip, draft_tokens=draft_tokens, **args
    )
    record = gen.speculative
    ids = gen.trace.extra["generated_token_ids"][0]
    rejected = [None if d is None else model.token_strings([d])[0] for d in record.rejected_drafts[0]]
    return DraftedContinuation(
        model.token_strings(ids),
        record.sources[0],
        rejected,
        record.drafted,
        record.accepted,
        record.draft_skip_rate,
        args.get("policy", "calibrated"),
    )


def capture(model: GatedModel, text: str, chat: bool, adapter_scope: str = "auto") -> tuple[Trace, bool]:
    """The prompt's gate values with nothing skipped (the basis of estimate mode), and whether it was cut."""
    batch = model.encode([text], chat=chat, max_tokens=MAX_PROMPT_TOKENS)
    plan = model.make_plan(0.0, adapter_scope=adapter_scope)
    trace = model.trace_of(batch, model.forward(batch.input_ids, batch.attention_mask, plan), plan)
    return trace, bool(batch.truncated[0])


def estimate(model: GatedModel, captured: Trace, settings: Settings) -> Trace:
    """Estimate-mode trace: the policy applied to the captured gates, no forward pass."""
    return model.estimate(captured, **settings.skip_args(model))


def exact(model: GatedModel, text: str, chat: bool, settings: Settings) -> tuple[Trace, PromptQuality, float]:
    """Exact-mode trace (later layers see the changed residuals), prompt quality and seconds taken."""
    start = time.perf_counter()
    plan = model.make_plan(**settings.skip_args(model))
    batch = model.encode([text], chat=chat, max_tokens=MAX_PROMPT_TOKENS)
    result = model.forward(batch.input_ids, batch.attention_mask, plan)  # one gated pass: trace and logits
    trace = model.trace_of(batch, result, plan)
    quality = prompt_quality(model, batch, result.logits)
    return trace, quality, time.perf_counter() - start


def lens(model: GatedModel, text: str, settings: Settings):
    """The logit lens of the exact gated run of `text`: a `LensGrid` and its settled table."""
    from analysis.experiments.logit_lens import grid_counts, logit_lens, settled_table

    grid = logit_lens(model, text, max_tokens=MAX_PROMPT_TOKENS, **settings.skip_args(model))
    return grid, settled_table(grid_counts(grid))


def compare_decisions(estimated: Trace, exact_trace: Trace) -> np.ndarray:
    """[T, L, 2] bool: cells where estimate and exact decisions differ."""
    return estimated.sequences[0].skipped != exact_trace.sequences[0].skipped


def prompt_blocks(model: GatedModel, text: str) -> torch.Tensor:
    batch = model.encode([text], max_tokens=MAX_PROMPT_TOKENS)
    return batch.input_ids


def attribution(model: GatedModel, text: str, chat: bool, settings: Settings, layer: int, branch: str):
    """Gate attribution of one (layer, branch) for every position, in the exact run of these settings."""
    from analysis.experiments.attribution import gate_attributions

    return gate_attributions(
        model, text, layer, branch, max_tokens=MAX_PROMPT_TOKENS, chat=chat, **settings.skip_args(model)
    )


def attention_sources(
    model: GatedModel, text: str, chat: bool, settings: Settings, layer: int, branch: str, position: int, source: int
):
    """The term of attention layer `source` in the gate at (position, layer, branch), by source token."""
    from analysis.experiments.attribution import attention_sources as split

    return split(
        model,
        text,
        layer,
        branch,
        position,
        source,
        max_tokens=MAX_PROMPT_TOKENS,
        chat=chat,
        **settings.skip_args(model),
    )


def why(model: GatedModel, text: str, n_entries: int, skip_fraction: float, on_step=None):
    """Exact harm of `n_entries` single skips on `text` and the signal comparison: (entries, signals)."""
    from analysis.experiments.faithfulness import faithfulness

    return faithfulness(
        model,
        text,
        n_exact=n_entries,
        max_tokens=MAX_PROMPT_TOKENS,
        skip_fraction=skip_fraction,
        show_progress=False,
        on_step=on_step,
    )


# ---- corpus: the data directory
UPLOAD_LIMIT_BYTES = 2_000_000  # one uploaded text
DATA_QUOTA_BYTES = 500_000_000  # the data directory; oldest uploads are evicted first
UPLOAD_MARK = ".uploaded"  # in a dataset folder the dashboard collected from an upload (evictable)
SAMPLE_PARAGRAPHS = 24


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    model: str
    gates: str
    tokens: int
    created: str  # the manifest's date (UTC)
    uploaded: bool  # collected from an upload (the quota may evict it); else a user's own

    def as_row(self) -> dict:
        return {
            "dataset": self.name,
            "model": self.model,
            "gates": self.gates,
            "tokens": self.tokens,
            "date": self.created,
            "origin": "upload" if self.uploaded else "collected",
        }


class DataDir:
    """The dashboard's datasets: the Corpus view lists, opens and collects only these.

    A visitor names a dataset, never a path: a name that is not a complete dataset directly in
    the folder is refused with the same line whether or not something of that name exists
    anywhere. Uploads are size-limited; collections write into a unique temporary folder and
    are renamed into place at the end, so two sessions collecting the same text never write
    into one folder; the folder's total size is held under a quota by evicting the oldest
    uploaded datasets (never datasets a user collected there with `gateskip collect`)."""

    def __init__(self, root: Path, quota_bytes: int = DATA_QUOTA_BYTES, upload_limit: int = UPLOAD_LIMIT_BYTES):
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.upload_limit = upload_limit

    def datasets(self) -> list[DatasetInfo]:
        """Complete datasets directly in the folder, newest first (`problems` names the others)."""
        return self.scan()[0]

    def problems(self) -> list[str]:
        """One line per folder in the data folder that is not a usable dataset (damaged, incomplete)."""
        return self.scan()[1]

    def scan(self) -> tuple[list[DatasetInfo], list[str]]:
        """(`datasets`, `problems`) from one pass over the folder's manifests."""
        from analysis.traces.dataset import Manifest

        found, problems = [], []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                manifest = Manifest.read(folder)
            except GateSkipError as err:
                problems.append(f"{folder.name}: {str(err).replace(str(folder), 'its folder')}")
                continue
            if not manifest.complete:
                problems.append(f"{folder.name}: incomplete (collection did not finish)")
                continue
            stamp = (folder / "manifest.json").stat().st_mtime
            found.append(
                DatasetInfo(
                    name=folder.name,
                    model=str(manifest.settings.get("model", "?")),
                    gates=str(manifest.settings.get("gates", "?")),
                    tokens=int(manifest.tokens),
                    created=time.strftime("%Y-%m-%d %H:%M", time.gmtime(stamp)),
                    uploaded=(folder / UPLOAD_MARK).is_file(),
                )
            )
        return sorted(found, key=lambda d: d.created, reverse=True), problems

    def open(self, name: str):
        """A DuckDB view of the dataset `name` (one connection per session)."""
        from analysis.traces.tracedb import TraceDB

        name = str(name).strip()
        if not name or name not in {d.name for d in self.datasets()}:
            raise GateSkipError(f"{name!r} is not a dataset in the dashboard's data folder; choose one from the list")
        return TraceDB(self.root / name)

    def collect(self, model: GatedModel, name: str, source: str, data: bytes, on_progress=None, **skip_args) -> str:
        """Collect an uploaded text (paragraphs split on blank lines) into the folder; returns its name."""
        if len(data) > self.upload_limit:
            raise GateSkipError(
                f"{source} is {len(data) / 1e6:.1f} MB; uploads are limited to {self.upload_limit / 1e6:.1f} MB"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise GateSkipError(f"{source} is not UTF-8 text") from None
        return self._collect(model, name, source, text, uploaded=True, on_progress=on_progress, **skip_args)

    def collect_sample(self, model: GatedModel, on_progress=None, **skip_args) -> str:
        """A small dataset of held-out pydoc prose with `model`'s settings, so the view is never empty."""
        from gateskip_core.data import paragraphs, pydoc_texts

        paras = [p for t in pydoc_texts("validation") for p in paragraphs(t)][:SAMPLE_PARAGRAPHS]
        name = dataset_name("sample-pydoc", model, "\n\n".join(paras), skip_args)
        return self._collect(
            model, name, "pydoc", "\n\n".join(paras), uploaded=False, on_progress=on_progress, **skip_args
        )

    def _collect(self, model, name: str, source: str, text: str, uploaded: bool, on_progress, **skip_args) -> str:
        import tempfile

        from analysis.experiments.collect import collect_dataset
        from gateskip_core.data import paragraphs

        if (self.root / name).is_dir():
            return name  # collected before (or by another session meanwhile)
        paras = paragraphs(text)
        if not paras:
            raise GateSkipError(f"{source} holds no text")
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".collecting-", dir=self.root))  # unique per collection
        try:
            folder = work / "dataset"
            collect_dataset(
                model, [(source, paras)], folder, max_tokens=128, shard_size=64, show_progress=False,
                log=lambda msg: None, on_progress=on_progress, **skip_args,
            )  # fmt: skip
            if uploaded:
                (folder / UPLOAD_MARK).write_text(source, encoding="utf-8")
            try:
                os.rename(folder, self.root / name)  # atomic; fails if another session got there first
            except OSError:
                if not (self.root / name).is_dir():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.enforce_quota(keep=name)
        return name

    def size_of(self, name: str) -> int:
        return sum(f.stat().st_size for f in (self.root / name).rglob("*") if f.is_file())

    def enforce_quota(self, keep: str | None = None) -> list[str]:
        """Evict the oldest uploaded datasets (never `keep`, never a user's own) until under the quota."""
        infos = self.datasets()
        total = sum(self.size_of(d.name) for d in infos)
        evicted = []
        for info in sorted((d for d in infos if d.uploaded and d.name != keep), key=lambda d: d.created):
            if total <= self.quota_bytes:
                break
            total -= self.size_of(info.name)
            shutil.rmtree(self.root / info.name, ignore_errors=True)
            evicted.append(info.name)
        return evicted


def dataset_name(prefix: str, model: GatedModel, text: str, skip_args: dict) -> str:
    """One folder per (model, gates, text, settings): the same upload with the same settings is reused."""
    import hashlib
    import json

    key = json.dumps(
        [model.name, model.gates_label, hashlib.sha256(text.encode()).hexdigest(), skip_args], default=repr
    )
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in prefix)[:40].strip("-") or "upload"
    return f"{safe}-{Path(model.name).name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
