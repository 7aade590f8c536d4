"""Gate training: cross-entropy (or KL to the original model) + lambda * sparsity.

    loss = CE(next token) + lambda * mean_branches(mean(g^2))      (l2; l1: mean(|g|))
           [+ rank_weight * ranking loss]
    --distill: KL(original model || gated model) in place of CE

Skipping is applied while training (quantile policy, per sequence). The budget
either rises linearly from `skip_start` to `skip_end` over `skip_ramp_steps`
(`ramp`) or is drawn uniformly from [skip_start, skip_end] at every step
(`random`, so that one gate set serves every budget of the slider). It is spread
over (layer, branch) uniformly or by the global allocation (`allocation.py`),
whose sensitivity profile is measured on the original model before training.
What tells a gate that skipping *this* token hurts (`--skip-gradient`, `--rank-weight`):
- by default (the paper) a skipped token's branch adds nothing (or its stand-in), so its gate
  gets no gradient from the task loss: gates learn only how much to scale the tokens they keep;
- `straight-through`: the forward is unchanged, but the backward treats every decision as if
  the gate had scaled (branch output - stand-in), so a skipped token's gate receives the
  first-order change of the loss from its skip;
- `rank_weight > 0`: a pairwise ranking loss within each (sequence, layer, branch) between the
  gates (in logit space) and a per-token target measured on the same masked walk (detached):
  `rank_target="residual"`, how much skipping would change the residual stream,
  |branch(x) - stand-in| / |h|; `"first-order"`, the skip's first-order cost to the task loss,
  |dL/dh . (branch(x) - stand-in)| (the gradient at the residual where the branch adds, from one
  more backward pass): gates learn to order tokens by what their skip costs;
- `router_first N`: for the first N steps only the gates and stand-ins train on a frozen
  backbone (SkipGPT's schedule); the adapter joins after.
By default only the gates train (frozen backbone); `adapter="lora:R"`
trains a LoRA adapter with them and `adapter="full"` every backbone weight. The
user's original model stays frozen: it is the distillation teacher and the
reference every quality metric compares against (`adapter.py`).

Reproducibility: the batch of step i is a pure function of (seed, i), and the
training state (gates, optimiser, step) is checkpointed in safetensors, so
`resume=True` continues a killed run and ends with the same gates as an
uninterrupted run. Runs unchanged under `accelerate launch` (data parallel):
each process takes its share of every batch's rows.

The loss of a batch is `objective.py`, the training-state file `state.py`, the training text
`chat_data.py` and the calibration texts `calibration_texts.py`; this module runs the steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from gateskip_core.backbone.quantisation import parse_weights
from gateskip_core.backbone.registry import DEFAULT_MODEL
from gateskip_core.branches import branches_per_token
from gateskip_core.data import paragraphs, read_text_file, token_blocks
from gateskip_core.errors import GateSkipError
from gateskip_core.files import check_writable
from gateskip_core.gating.adapter import AdapterSpec, LoraAdapter, adapter_tensors, make_trainable_copy
from gateskip_core.gating.checkpoint import GateCheckpoint, save_gates
from gateskip_core.gating.fill import FillSpec, SkipFill
from gateskip_core.gating.gates import GateSet, parse_gate_variant
from gateskip_core.model import GatedModel, load_model, resolve_device, resolve_dtype
from gateskip_core.skipping.allocation import ALLOCATIONS, allocate_budget
from gateskip_core.skipping.calibration import CALIBRATION_BUDGETS, record_calibration_texts
from gateskip_core.skipping.plan import ADAPTER_SCOPES, SKIP_GRADIENTS
from gateskip_core.traces.compute import branch_saving_flops
from gateskip_core.training.calibration_texts import calibration_texts
from gateskip_core.training.chat_data import builtin_texts
from gateskip_core.training.objective import RANK_TARGETS, GateObjective
from gateskip_core.training.sensitivity import measure_sensitivity
from gateskip_core.training.state import check_state, load_state, save_state, state_file
from gateskip_core.validation import whole_number


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
    gate: str = "vector"  # vector | scalar | mlp | lowrank:R
    shared: bool = False
    adapter: str = "none"  # none (frozen backbone) | lora:R | full
    steps: int = 200
    seq_len: int = 128
    batch: int = 4
    lr: float = 1e-2  # gates
    adapter_lr: float = 1e-3  # the backbone's adapter (LoRA) or weights (full)
    sparsity_weight: float = 0.1
    sparsity_loss: str = "l2"
    skip_start: float = 0.0
    skip_end: float = 0.2
    skip_ramp_steps: int = 100
    budget_schedule: str = "ramp"  # ramp | random
    allocation: str = "uniform"  # uniform | global
    bf16: bool = False  # bfloat16 autocast for the forward passes
    device: str = "cpu"  # cpu | cuda | cuda:N | mps; under `accelerate launch`, each process's own device
    dtype: str = "float32"  # the frozen backbone's weights (float32 | bfloat16 | float16); what trains is float32
    data: list[str] = field(default_factory=lambda: ["builtin"])
    distill: bool = False
    out: str = "gates.safetensors"
    resume: bool = False
    seed: int = 0
    checkpoint_every: int = 25
    val_every: int = 50
    val_batches: int = 4
    int8: bool = False
    calibrate: bool = True
    skip_fill: str = "zero"  # zero (the paper) | mean | lowrank:R: what a skipped branch adds
    adapter_scope: str = "all"  # all | skipped: where the adapter (and soft gates) apply
    init: str = ""  # a gate checkpoint to start from (gates, adapter, stand-ins, sensitivity)
    teacher_top_k: int = 0  # distillation against the teacher's top-k log-probs, cached per block (0: exact)
    skip_gradient: str = "none"  # none (the paper) | straight-through: skipped tokens' gates learn their skip's cost
    rank_weight: float = 0.0  # weight of the pairwise ranking loss toward each skip's cost
    rank_target: str = "residual"  # residual | first-order: what the ranking loss orders tokens by
    router_first: int = 0  # steps at the start in which only gates and stand-ins train
    chat_share: float = 0.0  # builtin data: least share of training characters that are the model's chat answers
    weights: str = "fp32"  # the backbone's projections: fp32 | int8 | int4 (dequantised quanto weights)

    def validate(self) -> None:
        parse_gate_variant(self.gate)
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        if parse_weights(self.weights).kernels:  # quanto's frozen modules have no float weights to train through
            raise GateSkipError(
                f"--weights {self.weights}: train on the dequantised weights ({self.weights.split(':')[0]})"
            )
        adapter = AdapterSpec.parse(self.adapter)
        FillSpec.parse(self.skip_fill)
        if self.adapter_scope not in ADAPTER_SCOPES:
            raise GateSkipError(f"--adapter-scope must be one of {', '.join(ADAPTER_SCOPES)}")
        if adapter.kind == "full" and resolve_dtype(self.dtype) != torch.float32:
            raise GateSkipError("--adapter full trains the backbone's weights: it needs --dtype float32")
        if self.adapter_scope == "skipped" and adapter.kind == "full":
            raise GateSkipError("--adapter-scope skipped needs --adapter none or lora:R")
        if self.skip_gradient not in SKIP_GRADIENTS:
            raise GateSkipError(f"--skip-gradient must be one of {', '.join(SKIP_GRADIENTS)}")
        whole_number("--router-first", self.router_first, minimum=0)
        if not 0 <= self.chat_share < 1:  # NaN fails too
            raise GateSkipError(f"--chat-share must lie in [0, 1), got {self.chat_share}")
        if self.chat_share and self.data != ["builtin"]:
            raise GateSkipError("--chat-share needs --data builtin (the model's own chat answers)")
        if not math.isfinite(self.rank_weight) or self.rank_weight < 0:
            raise GateSkipError(f"--rank-weight must be a number >= 0, got {self.rank_weight}")
        if self.rank_target not in RANK_TARGETS:
            raise GateSkipError(f"--rank-target must be one of {', '.join(RANK_TARGETS)}, got {self.rank_target!r}")
        if self.rank_target != "residual" and not self.rank_weight:
            raise GateSkipError("--rank-target needs --rank-weight > 0 (the ranking loss it is the target of)")
        if self.teacher_top_k and not self.distill:
            raise GateSkipError("--teacher-top-k needs --distill")
        whole_number("--teacher-top-k", self.teacher_top_k, minimum=0)
        if self.budget_schedule not in ("ramp", "random"):
            raise GateSkipError("--budget-schedule must be ramp or random")
        if self.allocation not in ALLOCATIONS:
            raise GateSkipError(f"--allocation must be one of {', '.join(ALLOCATIONS)}")
        if self.sparsity_loss not in ("l1", "l2"):
            raise GateSkipError("--sparsity-loss must be l1 or l2")
        for name in ("steps", "batch", "checkpoint_every", "val_every", "val_batches"):
            whole_number(f"--{name.replace('_', '-')}", getattr(self, name))
        whole_number("--seq-len", self.seq_len, minimum=8)
        whole_number("--skip-ramp-steps", self.skip_ramp_steps, minimum=0)
        if math.isnan(self.sparsity_weight) or self.sparsity_weight < 0:
            raise GateSkipError(f"--sparsity-weight must be a number >= 0, got {self.sparsity_weight}")
        for name in ("skip_start", "skip_end"):
            if not 0 <= getattr(self, name) <= 1:  # NaN fails too
                raise GateSkipError(f"--{name.replace('_', '-')} must lie in [0, 1]")
        if not self.out.endswith(".safetensors"):
            raise GateSkipError("--out must end in .safetensors")
        # Files are looked for now, before the model loads (read once it has: the tokenizer is needed).
        for name in [] if self.data == ["builtin"] else self.data:
            if not Path(name).is_file():
                raise GateSkipError(f"file not found: {name}")  # data.read_text_file's words
        if self.init and not Path(self.init).is_file():
            raise GateSkipError(f"gate checkpoint not found: {self.init}")
        for name in ("lr", "adapter_lr"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise GateSkipError(f"--{name.replace('_', '-')} must be a positive number")

    def budget_at(self, step: int) -> float:
        """The step's total budget: a pure function of (seed, step), so resumed runs draw the same."""
        if self.budget_schedule == "random":
            seeded = torch.Generator().manual_seed(self.seed * 7919 + step + 1)
            u = torch.rand((), generator=seeded, device="cpu").item()  # the CPU generator: same on every device
            return self.skip_start + (self.skip_end - self.skip_start) * u
        frac = min(1.0, step / self.skip_ramp_steps) if self.skip_ramp_steps > 0 else 1.0
        return self.skip_start + (self.skip_end - self.skip_start) * frac


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    history: list[dict]
    metrics: dict
    is_main_process: bool = True


def _load_texts(config: TrainConfig, gm: GatedModel, progress) -> tuple[list[str], list[str]]:
    if config.data == ["builtin"]:
        return builtin_texts(gm, "train", progress, config.chat_share), builtin_texts(gm, "validation", progress)
    paras: list[str] = []
    for name in config.data:
        paras.extend(paragraphs(read_text_file(name)))
    if len(paras) < 2:
        raise GateSkipError("training data needs at least two paragraphs")
    # Deterministic split: every 10th paragraph is validation.
    return [p for i, p in enumerate(paras) if i % 10], [p for i, p in enumerate(paras) if not i % 10] or paras[:1]


@dataclass
class _Setup:
    """What a training run works on: the model, the gates and backbone that train, the data."""

    gm: GatedModel
    gates: GateSet
    adapter: AdapterSpec
    student: nn.Module  # the backbone the walk runs: the original (frozen), or a trainable copy (full)
    lora: LoraAdapter | None  # a trainable LoRA adapter on the original's weights
    fill: SkipFill | None  # trainable stand-ins for skipped branches (None: the paper's zero)
    train_data: torch.Tensor  # [N, seq_len]
    val_data: torch.Tensor
    sensitivity: np.ndarray | None  # the global allocation's profile, measured on the original
    sensitivity_seconds: float = 0.0  # time the measurement took (0 when none ran)

    def budget_table(self, total: float) -> np.ndarray:
        """The step's [n_layers, 2] skip rates for a total budget (uniform, or the global allocation)."""
        if self.sensitivity is None:
            return np.full((self.gm.spec.n_layers, 2), total)
        return allocate_budget(total, self.sensitivity, branch_saving_flops(self.gm.spec))


def _setup(
    config: TrainConfig, log: Callable[[str], None], state_path: Path | None = None, device: torch.device | None = None
) -> _Setup:
    torch.manual_seed(config.seed)
    device = device or resolve_device(config.device)
    gm = load_model(config.model, progress=log, weights=config.weights, device=device, dtype=config.dtype)
    gate_variant, gate_rank = parse_gate_variant(config.gate)
    adapter = AdapterSpec.parse(config.adapter)
    # What trains is made on the CPU (the same initial values on every device) and moved, in float32.
    gates = GateSet(gm.spec.n_layers, gm.spec.d_model, gate_variant, config.shared, rank=gate_rank).to(device)
    for p in gates.parameters():
        p.requires_grad_(True)
    student = make_trainable_copy(gm.original, adapter) if adapter.kind == "full" else gm.original
    lora = LoraAdapter(gm.spec.layers, adapter.rank).float() if adapter.kind == "lora" else None
    fill_spec = FillSpec.parse(config.skip_fill)
    fill = SkipFill(gm.spec.n_layers, gm.spec.d_model, fill_spec).to(device) if fill_spec.kind != "zero" else None
    init_sensitivity = (
        _start_from(config.init, gm, gates, adapter, student, lora, fill, config, log) if config.init else None
    )
    if fill is not None:
        for p in fill.parameters():
            p.requires_grad_(True)
    train_texts, val_texts = _load_texts(config, gm, log)
    train_blocks = list(token_blocks(gm.tokenizer, train_texts, config.seq_len))
    val_blocks = list(token_blocks(gm.tokenizer, val_texts, config.seq_len))[: config.val_batches * config.batch]
    if len(train_blocks) < config.batch:
        raise GateSkipError(
            f"training data gives {len(train_blocks)} blocks of {config.seq_len} tokens; need {config.batch}"
        )
    if not val_blocks:
        raise GateSkipError("validation data is shorter than one block")
    train_data, val_data = torch.stack(train_blocks), torch.stack(val_blocks)
    sensitivity = init_sensitivity if config.allocation == "global" else None
    if config.allocation == "global" and state_path is not None and state_path.exists():
        with safe_open(str(state_path), framework="pt") as f:
            if "sensitivity" in f.keys():
                sensitivity = f.get_tensor("sensitivity").numpy()
    if config.allocation == "global" and sensitivity is None:
        # Measured on the original model (the student starts equal to it), from fixed training blocks.
        blocks = train_data[: max(4, config.batch)].to(device)
        log(
            f"measuring the sensitivity of every (layer, branch) for the global allocation: "
            f"{branches_per_token(gm.spec.n_layers) + 1} passes over {len(blocks)} blocks"
        )
        start = time.perf_counter()
        sensitivity = measure_sensitivity(gm.spec, blocks)
        measured = time.perf_counter() - start
        log(f"measured the sensitivity in {measured:.0f} s")
        return _Setup(gm, gates, adapter, student, lora, fill, train_data, val_data, sensitivity, measured)
    return _Setup(gm, gates, adapter, student, lora, fill, train_data, val_data, sensitivity)


def _start_from(path: str, gm: GatedModel, gates: GateSet, adapter: AdapterSpec, student, lora, fill, config, log):
    """Load `path`'s gates and adapter into the ones that train; fit the stand-ins on it without
    training (same adapter scope) when it has none of this kind. Returns its sensitivity profile."""
    from gateskip_core.gating.checkpoint import load_gates
    from gateskip_core.training.fill_fitting import fit_fill

    ckpt = load_gates(path, gm.spec.fingerprint())
    if (ckpt.gates.variant_label, ckpt.gates.shared) != (gates.variant_label, gates.shared):
        raise GateSkipError(f"--init {path} has {ckpt.gates.describe()}, not {gates.describe()}")
    if ckpt.adapter != adapter:
        raise GateSkipError(f"--init {path} has adapter {ckpt.adapter.label}, not {adapter.label}")
    log(f"starting from {path}")
    with torch.no_grad():
        gates.load_state_dict(ckpt.gates.state_dict())
        if adapter.kind == "lora":
            stored = LoraAdapter.from_checkpoint(gm.spec.layers, adapter, ckpt.adapter_tensors)
            lora.load_state_dict(stored.state_dict())
        elif adapter.kind == "full":
            params = dict(student.named_parameters())
            for key, value in ckpt.adapter_tensors.items():
                params[key.removeprefix("adapter.")].add_(value.float())
    if fill is not None:
        start = ckpt.fill if ckpt.fill is not None and ckpt.fill.spec == fill.spec else None
        if start is None:
            init_view = gm.view(ckpt.gates, "init", replace(ckpt, adapter_scope=config.adapter_scope))
            start = fit_fill(init_view, fill.spec, calibration_texts(gm, log), progress=log)
        with torch.no_grad():
            fill.load_state_dict(start.state_dict())
    return ckpt.sensitivity


def _optimizer(setup: _Setup, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the gates at `lr` and the backbone's trainable weights (adapter) at `adapter_lr`."""
    groups = [{"params": list(setup.gates.parameters()), "lr": config.lr}]
    if setup.fill is not None:  # stand-ins learn at the adapter's rate
        groups.append({"params": list(setup.fill.parameters()), "lr": config.adapter_lr})
    backbone_params = [p for p in setup.student.parameters() if p.requires_grad]
    if setup.lora is not None:
        backbone_params += list(setup.lora.parameters())
    if backbone_params:
        groups.append({"params": backbone_params, "lr": config.adapter_lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def _batch_rows(config: TrainConfig, n_rows: int, step: int, process: int, n_processes: int) -> torch.Tensor:
    """Rows of step `step`: an epoch-wise permutation seeded by (seed, epoch), a pure function of the step."""
    per_epoch = n_rows // config.batch
    epoch, offset = divmod(step, per_epoch)
    seeded = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    perm = torch.randperm(n_rows, generator=seeded, device="cpu")  # rows of the CPU-held data, same on every device
    rows = perm[offset * config.batch : (offset + 1) * config.batch]
    return rows[process::n_processes]


def _validate(objective: GateObjective, setup: _Setup, config: TrainConfig, budget: float) -> dict:
    objective.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(setup.val_data), config.batch):
            batch = setup.val_data[i : i + config.batch].to(setup.gm.device)
            _, task, _, _ = objective(batch, setup.budget_table(budget))
            losses.append(float(task))
    objective.train()
    return {"val_loss": float(np.mean(losses)), "val_budget": budget}


def calibrate_checkpoint(
    gm: GatedModel, ckpt: GateCheckpoint, texts: list[str], progress: Callable[[str], None] = lambda m: None
) -> None:
    """Fit and store calibrated thresholds (uniform and, with a profile, global) for CALIBRATION_BUDGETS;
    `progress` hears one line per allocation with the time it took."""
    ckpt.calibration_budgets = CALIBRATION_BUDGETS
    record_calibration_texts(ckpt, texts)  # on-the-fly fits of other budgets reuse them
    allocations = ["uniform"] + (["global"] if ckpt.sensitivity is not None else [])
    fitted = {}
    for allocation in allocations:
        start = time.perf_counter()
        fitted[allocation] = np.stack(
            [
                gm.fit_thresholds(gm.budget(b, allocation=allocation), texts=texts).thresholds
                for b in CALIBRATION_BUDGETS
            ]
        )
        progress(f"calibrated {allocation} thresholds on {len(texts)} texts in {time.perf_counter() - start:.0f} s")
    ckpt.calibration_thresholds = fitted["uniform"]
    ckpt.global_thresholds = fitted.get("global", ckpt.global_thresholds)


def _checkpoint(setup: _Setup, config: TrainConfig, out: Path, metrics: dict, training: dict, log) -> GateCheckpoint:
    """Everything needed to rebuild the gated model, with calibrated thresholds fitted on it."""
    gm = setup.gm
    ckpt = GateCheckpoint(
        gates=setup.gates.eval(),
        model=gm.name,
        fingerprint=gm.spec.fingerprint(),
        training=training,
        metrics=metrics,
        adapter=setup.adapter,
        adapter_tensors=(
            setup.lora.checkpoint_tensors()
            if setup.lora is not None
            else adapter_tensors(setup.adapter, setup.student, gm.original)
        ),
        sensitivity=setup.sensitivity,
        fill=setup.fill.eval() if setup.fill is not None else None,
        adapter_scope=config.adapter_scope,
    )
    if config.calibrate:
        log(f"calibrating thresholds for budgets {CALIBRATION_BUDGETS[0]:g} .. {CALIBRATION_BUDGETS[-1]:g}")
        gm.attach_gates(setup.gates, out.name, ckpt)  # the adapted backbone, rebuilt from what the checkpoint stores
        calibrate_checkpoint(gm, ckpt, calibration_texts(gm, log), log)
    return ckpt


def _accelerator(config: TrainConfig):
    """(Accelerator, device). One process trains on --device. Under `accelerate launch` with several
    processes, each takes its own device from Accelerate (its GPU, or the CPU where there is none).
    Placement is ours (`device_placement=False`): the model is loaded there and every batch is moved."""
    import os

    from accelerate import Accelerator

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    wanted = resolve_device(config.device)
    on_cpu = not torch.cuda.is_available() if several else wanted.type == "cpu"
    accelerator = Accelerator(cpu=on_cpu, device_placement=False)
    return accelerator, accelerator.device if several else wanted


def train(config: TrainConfig, progress: Callable[[str], None] = print, show_bar: bool = True) -> TrainResult:
    """Train gates as `config` says; returns where the gates were written and the metrics."""
    from tqdm.auto import tqdm

    started = time.perf_counter()

    config.validate()
    out = check_writable(config.out)
    accelerator, device = _accelerator(config)
    is_main = accelerator.is_main_process
    log = progress if is_main else (lambda msg: None)
    state_path = state_file(out)
    _check_resume(config, state_path)
    setup = _setup(config, log, state_path if config.resume else None, device)
    objective = GateObjective(setup.student, setup.gm.original, setup.gates, setup.fill, config, setup.lora)
    optim = _optimizer(setup, config)
    start_step, history = 0, []
    if config.resume and state_path.exists():
        start_step, history = load_state(state_path, objective, optim)
        log(f"resuming from step {start_step}")
    wrapped, optim = accelerator.prepare(objective, optim)

    t0 = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start_step, disable=not (is_main and show_bar), desc="train gates")
    run = _Run(wrapped, objective, optim, accelerator, setup, config, device, state_path)
    try:
        for step in range(start_step, config.steps):
            record = _step(run, step)
            history.append(record)
            tokens_per_s = (step + 1 - start_step) * config.batch * config.seq_len / max(1e-9, time.perf_counter() - t0)
            _show_step(bar, record, tokens_per_s)
            if is_main and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
                save_state(
                    state_path, step + 1, accelerator.unwrap_model(wrapped), optim, history, config, setup.sensitivity
                )
            accelerator.wait_for_everyone()
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    metrics = {k: v for k, v in history[-1].items() if k.startswith("val")} if history else {}
    for p in objective.parameters():
        p.requires_grad_(False)
    if is_main:
        training = {**asdict(config), "seconds": round(seconds, 1), "processes": accelerator.num_processes}
        calibrating = time.perf_counter()
        save_gates(_checkpoint(setup, config, out, metrics, training, log), out, int8=config.int8)
        calibrated = time.perf_counter() - calibrating
        log(
            f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) after {config.steps} steps: {seconds:.0f} s of steps, "
            f"{setup.sensitivity_seconds:.0f} s measuring sensitivity, {calibrated:.0f} s calibrating and saving; "
            f"{time.perf_counter() - started:.0f} s in all (model and data loading included)"
        )
    accelerator.wait_for_everyone()
    return TrainResult(
        out=out, steps=config.steps, seconds=seconds, history=history, metrics=metrics, is_main_process=is_main
    )


def _check_resume(config: TrainConfig, state_path: Path) -> None:
    """An earlier run's state file needs --resume, and one to resume from must be readable: both are
    refused before any model or data work."""
    if state_path.exists() and not config.resume:
        raise GateSkipError(f"{state_path} exists from an earlier run; pass --resume to continue it or delete it")
    if config.resume and state_path.exists():
        check_state(state_path)


@dataclass
class _Run:
    """What every step of a run uses."""

    wrapped: nn.Module  # the objective as Accelerate prepared it
    objective: GateObjective
    optim: torch.optim.Optimizer
    accelerator: object
    setup: _Setup
    config: TrainConfig
    device: torch.device
    state_path: Path


def _step(run: _Run, step: int) -> dict:
    """One optimiser step on the step's rows at the step's budget (and validation when due): its record."""
    config, setup = run.config, run.setup
    budget = config.budget_at(step)
    rows = _batch_rows(
        config, len(setup.train_data), step, run.accelerator.process_index, run.accelerator.num_processes
    )
    loss, task, sparsity, skip_rate = run.wrapped(
        setup.train_data[rows].to(run.device), setup.budget_table(budget), rows
    )
    if not torch.isfinite(loss):
        raise GateSkipError(
            f"loss became {float(loss.detach())} at step {step}; stopped. The last good checkpoint is {run.state_path}"
            " (try a lower --lr)"
        )
    run.optim.zero_grad(set_to_none=True)
    run.accelerator.backward(loss)
    if step < config.router_first:  # router first: the backbone's adapter waits (no grad: no update)
        for p in [*setup.student.parameters(), *(setup.lora.parameters() if setup.lora is not None else ())]:
            p.grad = None
    run.optim.step()
    record = {
        "step": step + 1,
        "loss": float(loss.detach()),
        "task": float(task),
        "sparsity": float(sparsity),
        "skip_rate": float(skip_rate),
        "budget": budget,
    }
    if (step + 1) % config.val_every == 0 or step + 1 == config.steps:
        # Validate at the schedule's end budget, so that values of a random schedule compare across steps.
        val_budget = config.skip_end if config.budget_schedule == "random" else budget
        record.update(_validate(run.objective, setup, config, val_budget))
    return record


def _show_step(bar, record: dict, tokens_per_s: float) -> None:
    bar.set_postfix(
        loss=f"{record['loss']:.3f}",
        sparsity=f"{record['sparsity']:.3f}",
        skip=f"{record['skip_rate']:.2f}",
        tok_s=f"{tokens_per_s:.0f}",
        refresh=False,
    )
    bar.update(1)
