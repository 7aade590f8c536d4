"""`gateskip bench`: speed and memory of every path, side by side in one process.

Sections (each a function returning rows; `--sections` chooses):
- `prefill`: dense (ungated original), masked and physical, per gate variant, skip budget
  and batch size; realised speedup over dense against the compute account's prediction.
- `decode`: KV-cached greedy decoding after a long prompt: Hugging Face `generate`, our
  dense walk, and the gated model (calibrated policy, physical path) per budget; tokens/s,
  the skip rate reached on the generated tokens, and two predictions of the speedup over our
  dense walk: the FLOP account and the bytes-read model (`compute.decode_step_bytes`).
  A LoRA adapter runs as per-row deltas on the original weights (dense baselines: the
  original); a gate spec `GATES@SCOPE` chooses the adapter scope (`all` | `skipped`) and
  `GATES@merged` the other adapter form, merged into a copy of the weights (scope `all`),
  whose dense baseline and Hugging Face `generate` run that copy.
- `capture`: gated forward alone vs forward + trace (decisions; with gate vectors).
- `collect`: `collect` throughput and peak resident memory at two corpus sizes (flat = bounded).
- `dashboard`: estimate-mode and exact-mode latency for a 128-token prompt (library calls).
- `rates`: the calibrated policy's reached skip rate on prose, chat and code against the budget.
- `memory`: peak resident memory of a fresh process that loads the model with gates and traces
  one sentence, against `--gates none` (`memory.py`).

Every timing: warm-up, then `repeats` runs; median, min and max are reported. The JSON
records torch threads, the CPU and the versions.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from gateskip_core import Capture, GateSkipError, load_model
from gateskip_core.branches import branches_per_token, skipped_fraction
from gateskip_core.model import Batch, GatedModel
from gateskip_core.traces.compute import account_sequence, adapted_rows, decode_step_bytes

from .clock import clock
from .memory import PeakRSS, bench_memory
from .speculative import bench_speculative

SECTIONS = ("prefill", "decode", "speculative", "memory", "capture", "collect", "dashboard", "rates", "corpus")


@dataclass
class BenchConfig:
    model: str = "smollm2-135m-instruct"
    device: str = "cpu"  # where the model runs; every clock read waits for it (clock.py)
    dtype: str = "float32"  # bfloat16 halves the bytes read; fast only on CPUs with native bf16 (AVX-512 BF16, AMX)
    gates: str = "default"  # the gates of decode, capture, collect, dashboard and rates
    weights: str = "fp32"  # the base model's projections (prefill, decode): fp32 | int8 | int4 | int4:quanto
    decode_variants: tuple[str, ...] = ("default", "default@all", "default@merged")  # decoding at batch 1
    memory_variants: tuple[str, ...] = ("default", "default-scalar")  # peak memory of load + one trace
    # prefill gate variants: GATES, GATES@all | GATES@skipped (adapter scope), GATES@merged (merged adapter)
    variants: tuple[str, ...] = ("default", "default@all", "default@merged", "default-scalar", "untrained:vector")
    prefill_tokens: int = 128
    prefill_skips: tuple[float, ...] = (0.0, 0.15, 0.25, 0.5, 0.7)
    prefill_batches: tuple[int, ...] = (1, 8)
    decode_prompt: int = 256
    new_tokens: int = 128
    decode_skips: tuple[float, ...] = (0.0, 0.25, 0.5)  # batch 1; larger batches run the last one
    decode_batches: tuple[int, ...] = (1, 8)
    decode_repeats: int = 2  # batch 1
    clock: str = "wall"  # 'wall' or 'cpu' (this process's CPU time: a shared machine; CPU runs only)
    chat_new_tokens: int = 48  # the chat setting: tokens answered to a chat prompt, batch 1, `gates` (0: none)
    batched_decode_repeats: int = 1  # larger batches (the targets are at batch 1; each run is long)
    collect_tokens: tuple[int, ...] = (2_000, 10_000)
    corpus_collect_tokens: int = 20_000  # collected for real, with 1 and 2 processes
    corpus_query_tokens: tuple[int, ...] = (100_000, 1_000_000)  # synthesised from the collected dataset
    dashboard_tokens: int = 128
    rates_skip: float = 0.25
    speculative_skips: tuple[float, ...] = (0.25, 0.5, 0.75)  # draft budgets (gateskip/bench/speculative.py)
    speculative_tokens: tuple[int, ...] = (2, 4, 6)  # draft tokens K
    speculative_prompt: int = 64  # prompt tokens (held-out prose)
    speculative_new_tokens: int = 48
    speculative_step_repeats: int = 20  # timings of one draft step / one verify pass
    repeats: int = 2
    sections: tuple[str, ...] = SECTIONS


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """One warm-up, then `repeats` runs: median, min and max seconds."""
    return interleaved({"fn": fn}, repeats)[0]["fn"]


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _text_of_tokens(model: GatedModel, n_tokens: int, offset: int = 0) -> str:
    """Held-out prose of `n_tokens` tokens including BOS (re-encodes to that length or one more)."""
    from gateskip_core.data import pydoc_texts

    ids = model.tokenizer(" ".join(pydoc_texts("validation")), add_special_tokens=False).input_ids
    start = offset * n_tokens
    return model.tokenizer.decode(ids[start : start + n_tokens - 1])


def _dense_walk(base: GatedModel, view: GatedModel) -> GatedModel:
    """Our walk without gates over the weights `view` runs (an adapted copy when its gates came
    with an adapter): two copies of the same weights can stream from memory at speeds up to 10%
    apart (measured here), so skipping is always compared with a dense walk over the same copy."""
    return GatedModel(view.backbone, base.tokenizer, base.name)


def _views(base: GatedModel, specs) -> dict[str, GatedModel]:
    """A view per gate spec `GATES[@all|@skipped|@merged]` (see `scope_of`)."""
    out = {}
    for spec in specs:
        gates, _, option = spec.partition("@")
        view = base.view()
        view.load_gates(gates)
        if option == "merged":
            view.attach_gates(view.gates, f"{view.gates_label}", view.checkpoint, merge=True)
        elif option not in ("", "all", "skipped"):
            raise GateSkipError(f"gate spec {spec!r}: after '@' put all, skipped or merged")
        out[spec] = view
    return out


def scope_of(spec: str) -> str:
    """The adapter scope a bench gate spec asks for: `@all` and `@merged` -> 'all', `@skipped` ->
    'skipped', none -> 'auto' (the gates' own)."""
    option = spec.partition("@")[2]
    return {"": "auto", "merged": "all"}.get(option, option)


def on_device(batch: Batch, device: torch.device) -> Batch:
    """`batch` with its tensors on `device` (encoded batches are host data), moved once, outside any timing."""
    return Batch(batch.input_ids.to(device), batch.attention_mask.to(device), batch.truncated)


# ---- prefill
def interleaved(fns: dict, repeats: int, warmups: dict | None = None) -> tuple[dict, dict]:
    """`timed` for several methods, run in turns (one warm-up each, then repeats rounds), so a
    machine whose speed drifts (shared cores, throttling) biases none of them. `warmups`: a
    cheaper call per method to warm up with (a short generation instead of a long one).
    Returns the timings and each method's last output (no extra run to inspect it)."""
    for name, fn in fns.items():
        (warmups or {}).get(name, fn)()
    times: dict[str, list[float]] = {name: [] for name in fns}
    outputs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            outputs[name] = fn()
            times[name].append(clock() - start)
    stats = {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for n, t in times.items()}
    return stats, outputs


def _decisions(view: GatedModel, ids, mask, plan):
    """A gated forward whose logits are dropped once computed: the decisions (for the compute
    account) are what the bench keeps, and [B, T, vocab] logits per setting would pile up."""
    result = view.forward(ids, mask, plan)
    result.logits = result.logits[:0]
    return result


def bench_prefill(base: GatedModel, cfg: BenchConfig, log) -> list[dict]:
    """Per batch size, the dense model and every (variant, skip, path) are timed in turns, so each
    speedup compares runs made under the same machine conditions."""
    from analysis.experiments.quality import evaluation_blocks

    rows = []
    for batch_size in cfg.prefill_batches:
        ids = evaluation_blocks(base, n_blocks=batch_size, seq_len=cfg.prefill_tokens).to(base.device)
        mask = torch.ones_like(ids)
        batch = Batch(ids, mask, [False] * len(ids))
        tokens = ids.numel()
        variants = cfg.variants if batch_size == min(cfg.prefill_batches) else cfg.variants[:1]
        views = _views(base, variants)
        plans = {
            (spec, skip, path): view.make_plan(skip, path=path, adapter_scope=scope_of(spec))
            for spec, view in views.items()
            for skip in cfg.prefill_skips
            for path in ("masked", "physical")
        }
        fns, dense_of = {}, {}  # each variant's dense baseline: a pass over the weights it reads
        for spec, view in views.items():
            dense_of[spec] = "dense" if view.backbone is base.original else f"dense ({spec} weights)"
            if dense_of[spec] not in fns:
                dense = _dense_walk(base, view)
                fns[dense_of[spec]] = partial(dense.forward, ids, mask, dense.make_plan(0.0))
        fns.update({key: partial(_decisions, views[key[0]], ids, mask, plan) for key, plan in plans.items()})
        t, outputs = interleaved(fns, cfg.repeats)
        for (spec, skip, path), plan in plans.items():
            view = views[spec]
            dense = t[dense_of[spec]]["median_s"]
            account = view.trace_of(batch, outputs[spec, skip, path], plan).compute
            predicted = account.dense_flops / account.executed_flops
            realised = dense / t[spec, skip, path]["median_s"]
            rows.append(
                {
                    "batch": batch_size,
                    "gates": spec,
                    "path": path,
                    "skip": skip,
                    "tokens_per_s": tokens / t[spec, skip, path]["median_s"],
                    "dense_tokens_per_s": tokens / dense,
                    **t[spec, skip, path],
                    "speedup_vs_dense": realised,
                    "predicted_speedup": predicted,
                    "realised_over_predicted": realised / predicted,
                    "net_flops_saved": account.net_saved_fraction,
                }
            )
        denses = ", ".join(
            f"{name} {tokens / t[name]['median_s']:.0f} tok/s" for name in sorted(set(dense_of.values()))
        )
        log(f"prefill batch {batch_size}: {len(plans)} settings timed against {denses}")
    return rows


# ---- decode
def _hf_generate(hf_model, tokenizer, batch: Batch, n_new: int):
    with torch.no_grad():
        return hf_model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )


def _decode_predictions(view: GatedModel, trace, prompt_len: int, batch_size: int, scope: str) -> dict[str, float]:
    """Predicted speedup over the dense walk from the generated tokens' decisions: FLOPs and bytes
    (the gates, stand-ins and the LoRA deltas of rows on the adapter included)."""
    spec = view.spec
    skipped = np.stack([s.skipped[s.prompt_length :] for s in trace.sequences])  # [B, N, L, 2]
    dense_run = np.ones(skipped.shape[2:], dtype=bool)
    gate_params = tuple(f // 2 for f in view.gate_flops())
    adapter_params = tuple(f // 2 for f in view.adapter_flops())
    adapted = adapted_rows(skipped, scope) if view.lora is not None else np.zeros_like(skipped)
    width = view.dtype.itemsize
    dense_bytes = gated_bytes = 0.0
    for step in range(skipped.shape[1]):
        context = prompt_len + step + 1
        dense_bytes += decode_step_bytes(spec, dense_run, context, batch_size, bytes_per_param=width)
        run = ~skipped[:, step].all(0)  # a weight is read when any token of the step runs the branch
        on = adapted[:, step]  # [B, L, 2]
        adapter_run = np.stack(
            [
                on[..., 0].any(0),
                (on[..., 0] & ~skipped[:, step, :, 0]).any(0),
                (on[..., 1] & ~skipped[:, step, :, 1]).any(0),
            ],
            -1,
        )
        gated_bytes += decode_step_bytes(
            spec, run, context, batch_size, gate_params, width, adapter_run=adapter_run, adapter_params=adapter_params
        )
    # FLOPs of the generated tokens only (positions after the prompt; attention over the cache)
    overheads = dict(fill_flops=view.fill_flops(), adapter_flops=view.adapter_flops(), adapter_scope=scope)
    accounts = [
        account_sequence(spec, s.skipped[s.prompt_length :], view.gate_flops(), s.n_tokens - s.prompt_length,
                         "physical", first_position=s.prompt_length, **overheads)
        for s in trace.sequences
    ]  # fmt: skip
    flops = sum(accounts[1:], accounts[0])
    generated = skipped.shape[1]
    return {
        "reached_skip_rate": skipped_fraction(skipped.sum(), skipped.shape[0] * generated, spec.n_layers),
        "predicted_speedup_bytes": dense_bytes / gated_bytes,
        "predicted_speedup_flops": flops.dense_flops / flops.skipping_flops,
    }


@dataclass(frozen=True)
class DecodeSetting:
    """What is decoded: `prompts` (one per sequence of the batch), through the chat template or not."""

    name: str  # 'prose' (held-out pydoc, `decode_prompt` tokens) or 'chat' (one chat prompt, below)
    prompts: tuple[str, ...]
    chat: bool
    new_tokens: int


# A chat prompt never trained on; chat_prompts()[5::11] are the calibration prompts (the prompt set's chat
# texts and the decode set's fit read them), so its skip rates are not held-out ones
CHAT_PROMPT_INDEX = 5


def bench_decode(base: GatedModel, cfg: BenchConfig, log) -> list[dict]:
    """Decoding per batch size: every gate variant (batch 1; larger batches: `cfg.gates`) and
    budget, timed in turns with Hugging Face `generate` and our dense walk over the same weights;
    then the chat setting (a chat answer at batch 1, `cfg.gates`)."""
    from gateskip_core.training.chat_data import chat_prompts

    rows = []
    for batch_size in cfg.decode_batches:
        variants = cfg.decode_variants if batch_size == 1 else (cfg.gates,)
        prompts = tuple(_text_of_tokens(base, cfg.decode_prompt, offset=i) for i in range(batch_size))
        prose = DecodeSetting("prose", prompts, False, cfg.new_tokens)
        rows += _decode_batch(base, _views(base, variants), cfg, prose, log)
    if cfg.chat_new_tokens and base.tokenizer.chat_template:
        chat = DecodeSetting("chat", (chat_prompts()[CHAT_PROMPT_INDEX],), True, cfg.chat_new_tokens)
        rows += _decode_batch(base, _views(base, (cfg.gates,)), cfg, chat, log)
    return rows


def _decode_batch(base, views: dict[str, GatedModel], cfg: BenchConfig, setting: DecodeSetting, log) -> list[dict]:
    """One setting and batch size: HF generate and our dense walk per set of weights, and every view
    at every skip, timed in turns."""
    batch_size = len(setting.prompts)
    batch = on_device(base.encode(setting.prompts, chat=setting.chat), base.device)  # HF `generate` takes it as it is
    skips = cfg.decode_skips if batch_size == 1 else cfg.decode_skips[-1:]
    fns, short, weights_of = _decode_timers(base, views, setting, batch, skips)
    repeats = cfg.decode_repeats if batch_size == 1 else cfg.batched_decode_repeats
    t, outputs = interleaved(fns, repeats, warmups=short)
    generated = batch_size * setting.new_tokens
    rows = []
    for weights in dict.fromkeys(weights_of.values()):
        hf, dense = t["hf-generate", weights]["median_s"], t["dense-walk", weights]["median_s"]
        common = {"setting": setting.name, "batch": batch_size, "weights": weights}
        hf_row = {"method": "hf-generate", "skip": 0.0, "tokens_per_s": generated / hf, **t["hf-generate", weights]}
        dense_row = {"method": "dense-walk", "skip": 0.0, "tokens_per_s": generated / dense, **t["dense-walk", weights]}
        best = t["hf-generate", weights]["min_s"] / t["dense-walk", weights]["min_s"]
        rows += [
            {**common, **hf_row},
            {**common, **dense_row, "vs_hf_generate": hf / dense, "vs_hf_generate_best": best},
        ]
        log(
            f"decode {setting.name} b{batch_size} ({weights}): HF {generated / hf:.1f} tok/s, dense walk "
            f"{generated / dense:.1f} tok/s"
        )
    prompt_len = int(batch.attention_mask.sum(1).max())
    for spec, view in views.items():
        weights = weights_of[spec]
        baseline = (t["hf-generate", weights], t["dense-walk", weights])
        for skip in skips:
            trace = outputs[spec, skip].trace
            row = _gated_decode_row(view, spec, weights, skip, t[spec, skip], baseline, trace, prompt_len, generated)
            rows.append({"setting": setting.name, **row})
            log(
                f"decode {setting.name} b{batch_size} {spec} skip {skip}: {row['speedup_vs_dense_walk']:.2f}x dense "
                f"walk (best of each {row['speedup_vs_dense_walk_best']:.2f}x; bytes model "
                f"{row['predicted_speedup_bytes']:.2f}x; generated tokens skip {row['reached_skip_rate']:.1%})"
            )
    return rows


def _decode_timers(base, views: dict[str, GatedModel], setting: DecodeSetting, batch, skips):
    """The timed calls (HF generate and the dense walk once per set of weights, each view at each skip),
    their short warm-up versions, and which weights each view runs on."""
    n_new = setting.new_tokens

    def ours(model, n=n_new, **skip_args):
        return model.generate(
            list(setting.prompts), max_new_tokens=n, chat=setting.chat, stop_at_eos=False, **skip_args
        )

    fns, short, weights_of = {}, {}, {}
    for spec, view in views.items():  # one dense walk and HF generate per set of weights
        weights = "original" if view.backbone is base.original else f"merged copy ({spec})"
        weights_of[spec] = weights
        if ("dense-walk", weights) not in fns:
            dense_model = _dense_walk(base, view)
            fns["hf-generate", weights] = partial(_hf_generate, view.backbone, base.tokenizer, batch, n_new)
            fns["dense-walk", weights] = partial(ours, dense_model, skip=0.0)
            short["hf-generate", weights] = partial(_hf_generate, view.backbone, base.tokenizer, batch, 4)
            short["dense-walk", weights] = partial(ours, dense_model, 4, skip=0.0)
        for skip in skips:
            args = dict(skip=skip, policy="calibrated", path="physical", adapter_scope=scope_of(spec))
            fns[spec, skip] = partial(ours, view, **args)
            short[spec, skip] = partial(ours, view, 4, **args)
    return fns, short, weights_of


def _gated_decode_row(view, spec, weights, skip, timing, baseline, trace, prompt_len, generated) -> dict:
    """One gated view's decoding row: speed against HF generate and the dense walk (`baseline`: their
    median seconds), and what the bytes and FLOPs models predicted from its skip decisions."""
    hf, dense = (b["median_s"] for b in baseline)
    batch_size = len(trace.sequences)
    scope = scope_of(spec) if scope_of(spec) != "auto" else view.adapter_scope
    predictions = _decode_predictions(view, trace, prompt_len, batch_size, scope)
    speedup = dense / timing["median_s"]
    return {
        "batch": batch_size,
        "weights": weights,
        "method": f"gated ({spec}, calibrated, physical)",
        "gates": spec,
        "adapter_scope": scope,
        "skip": skip,
        "tokens_per_s": generated / timing["median_s"],
        **timing,
        "vs_hf_generate": hf / timing["median_s"],
        "speedup_vs_dense_walk": speedup,
        "speedup_vs_dense_walk_best": baseline[1]["min_s"] / timing["min_s"],  # fastest run of each
        **predictions,
        "realised_over_bytes_model": speedup / predictions["predicted_speedup_bytes"],
    }


# ---- capture overhead
def bench_capture(base: GatedModel, cfg: BenchConfig, log) -> list[dict]:
    from analysis.experiments.quality import evaluation_blocks

    view = _views(base, [cfg.gates])[cfg.gates]
    ids = evaluation_blocks(base, n_blocks=1, seq_len=cfg.prefill_tokens).to(base.device)
    mask = torch.ones_like(ids)
    batch = Batch(ids, mask, [False])
    plan = view.make_plan(0.25)
    t, _ = interleaved(
        {
            "bare": partial(view.forward, ids, mask, plan),
            "traced": lambda: view.trace_of(batch, view.forward(ids, mask, plan), plan),
            "vectors": lambda: view.trace_of(
                batch, view.forward(ids, mask, plan, capture=Capture(gate_vectors=True)), plan
            ),
        },
        cfg.repeats * 3,
    )
    bare, traced, vectors = t["bare"], t["traced"], t["vectors"]
    rows = [
        {"what": "forward (decisions only)", **bare, "overhead": 0.0},
        {"what": "forward + trace", **traced, "overhead": traced["median_s"] / bare["median_s"] - 1},
        {
            "what": "forward + trace with gate vectors",
            **vectors,
            "overhead": vectors["median_s"] / bare["median_s"] - 1,
        },
    ]
    log(f"capture overhead: trace {rows[1]['overhead']:+.1%}, with vectors {rows[2]['overhead']:+.1%}")
    return rows


# ---- collect
def _paragraphs_for(model: GatedModel, n_tokens: int, max_tokens: int = 128) -> list[str]:
    from gateskip_core.data import paragraphs, pydoc_texts

    out, total = [], 0
    while total < n_tokens:
        for text in pydoc_texts(None):
            for para in paragraphs(text):
                out.append(para)
                total += min(max_tokens, len(model.tokenizer(para).input_ids) + 1)
                if total >= n_tokens:
                    return out
    return out


def bench_collect(base: GatedModel, cfg: BenchConfig, log) -> list[dict]:
    from analysis.experiments.collect import collect

    view = _views(base, [cfg.gates])[cfg.gates]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_tokens in cfg.collect_tokens:
            paras = _paragraphs_for(base, n_tokens)
            out = Path(tmp) / f"traces_{n_tokens}.parquet"
            with PeakRSS() as mem:
                start = clock()
                counts = collect(view, paras, out, batch_size=8, show_progress=False, skip=0.25, max_tokens=128)
                seconds = clock() - start
            tokens = counts["rows"] // branches_per_token(base.spec.n_layers)
            rows.append(
                {
                    "tokens": tokens,
                    "sequences": counts["sequences"],
                    "seconds": seconds,
                    "tokens_per_s": tokens / seconds,
                    "rss_before_mb": mem.start / 2**20,
                    "peak_rss_mb": mem.peak / 2**20,
                    "peak_growth_mb": (mem.peak - mem.start) / 2**20,
                    "file_mb": out.stat().st_size / 2**20,
                }
            )
            log(
                f"collect {tokens} tokens: {tokens / seconds:.0f} tok/s, peak RSS +{(mem.peak - mem.start) / 2**20:.0f} MB"
            )
    return rows


# ---- dashboard
def bench_dashboard(base: GatedModel, cfg: BenchConfig, log) -> list[dict]:
    from dashboard import service

    view = _views(base, [cfg.gates])[cfg.gates]
    text = _text_of_tokens(base, cfg.dashboard_tokens)
    captured, _ = service.capture(view, text, chat=False)

    def settings(budget):
        return service.Settings(cfg.model, view, "estimate", budget, "both", "quantile", True, 0, "auto")

    budgets = iter([0.1, 0.2, 0.3, 0.4, 0.5] * 100)
    estimate = timed(lambda: service.estimate(view, captured, settings(next(budgets))), cfg.repeats * 3)
    exact = timed(lambda: service.exact(view, text, False, settings(next(budgets))), cfg.repeats)
    log(f"dashboard: estimate {estimate['median_s'] * 1e3:.0f} ms, exact {exact['median_s']:.2f} s")
    return [
        {"mode": "estimate", "tokens": captured.sequences[0].n_tokens, **estimate},
        {"mode": "exact", "tokens": captured.sequences[0].n_tokens, **exact},
    ]


# ---- reached rates
def domain_texts(model: GatedModel, n: int = 8) -> dict[str, tuple[list[str], bool]]:
    """Prose (held-out pydoc), chat (prompts through the chat template) and code (Python source)."""
    import json as json_module

    from gateskip_core.data import paragraphs, pydoc_texts
    from gateskip_core.training.chat_data import chat_prompts

    prose = [p for t in pydoc_texts("validation") for p in paragraphs(t)][:n]
    chat = chat_prompts()[::33][:n]
    code = [chunk for chunk in inspect.getsource(json_module.decoder).split("\n\n\n") if chunk.strip()][:n]
    out = {"prose": (prose, False), "code": (code, False)}
    if model.tokenizer.chat_template:
        out["chat"] = (chat, True)
    return out


def bench_rates(base: GatedModel, cfg: BenchConfig, log) -> list[dict]:
    view = _views(base, [cfg.gates])[cfg.gates]
    rows = []
    for domain, (texts, chat) in domain_texts(base).items():
        trace = view.trace(texts, chat=chat, skip=cfg.rates_skip, policy="calibrated", max_tokens=256)
        rows.append(
            {
                "domain": domain,
                "texts": len(texts),
                "tokens": sum(s.n_tokens for s in trace.sequences),
                "budget": cfg.rates_skip,
                "budget_asks": trace.budget_fraction(),
                "reached": trace.skipped_fraction(),
                "net_flops_saved": trace.compute.net_saved_fraction,
            }
        )
        log(f"rates {domain}: budget asks {rows[-1]['budget_asks']:.1%}, reached {rows[-1]['reached']:.1%}")
    return rows


# ---- corpus
def bench_corpus(base: GatedModel, cfg: BenchConfig, log) -> list[dict]:
    """Collect throughput with 1 and 2 processes (`gateskip collect` / `accelerate launch`), then the
    ready-made DuckDB queries on datasets synthesised from the collected one, each in a fresh process."""
    from .corpus import collect_seconds, query_latencies_in_fresh_process, synthesise

    rows = []
    paras = _paragraphs_for(base, cfg.corpus_collect_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n\n".join(p.replace("\n\n", "\n") for p in paras), encoding="utf-8")
        collected = {}
        for processes in (1, 2):
            out = tmp / f"collected_{processes}"
            seconds = collect_seconds(corpus, out, cfg, processes)
            from analysis.traces.dataset import open_dataset

            tokens = open_dataset(out).n_tokens
            collected[processes] = out
            rows.append(
                {
                    "measure": f"collect, {processes} process(es)",
                    "tokens": tokens,
                    "seconds": seconds,
                    "tokens_per_s": tokens / seconds,
                }
            )
            log(
                f"corpus: collect {tokens} tokens with {processes} process(es): {tokens / seconds:.0f} tok/s "
                "(model loading included)"
            )
        for n_tokens in cfg.corpus_query_tokens:
            big = synthesise(collected[1], tmp / f"synthetic_{n_tokens}", n_tokens)
            for q in query_latencies_in_fresh_process(big):
                rows.append(
                    {
                        "measure": f"query {q['query']}",
                        "tokens": q["tokens"],
                        "seconds": q["seconds"],
                        "peak_rss_mb": q["peak_rss_mb"],
                        "trace_rows": q["trace_rows"],
                    }
                )
            worst = max(
                r["seconds"] for r in rows if r["measure"].startswith("query") and r["tokens"] == rows[-1]["tokens"]
            )
            log(f"corpus: {rows[-1]['tokens']} tokens (synthesised): slowest query {worst:.2f} s")
            import shutil

            shutil.rmtree(big)
    return rows


BENCHES = {
    "corpus": bench_corpus,
    "memory": lambda base, cfg, log: bench_memory(cfg.model, cfg.memory_variants, log, cfg.device, cfg.dtype),
    "prefill": bench_prefill,
    "decode": bench_decode,
    "speculative": lambda base, cfg, log: bench_speculative(base, cfg, log, interleaved, _text_of_tokens),
    "capture": bench_capture,
    "collect": bench_collect,
    "dashboard": bench_dashboard,
    "rates": bench_rates,
}


def run(cfg: BenchConfig, log=print) -> dict:
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown or not cfg.sections:
        raise GateSkipError(
            f"unknown bench section(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SECTIONS)}"
        )
    if cfg.clock not in ("wall", "cpu") or (cfg.clock == "cpu" and cfg.device != "cpu"):
        raise GateSkipError(f"--clock must be 'wall' or, on the CPU, 'cpu'; got {cfg.clock!r} on {cfg.device!r}")
    from . import clock as clock_module

    clock_module.CPU_TIME = cfg.clock == "cpu"
    base = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, weights=cfg.weights)
    started = clock()
    results = {"config": asdict(cfg), "machine": machine()}
    for section in cfg.sections:
        with torch.no_grad():
            results[section] = BENCHES[section](base, cfg, log)
    results["seconds"] = clock() - started
    return results


def tables(results: dict) -> str:
    """The results as plain-text tables, one per section."""
    import pandas as pd

    out = [
        f"machine: {results['machine']['cpu']} ({results['machine']['cores']} cores), torch threads "
        f"{results['machine']['torch_threads']}, torch {results['machine']['torch']}; {results['seconds']:.0f} s"
    ]
    for section in SECTIONS:
        if section in results:
            frame = pd.DataFrame(results[section])
            out.append(f"\n[{section}]\n" + frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return "\n".join(out)


def save(results: dict, path: Path) -> Callable:
    return lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1, default=float))
