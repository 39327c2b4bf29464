"""The training loop every script shares: arguments, AdamW (or Muon + AdamW) + warmup/cosine, accumulation, clipping,
evaluation, verified checkpoints with exact resume, a wall-clock budget, a clean stop on Ctrl-C or SIGTERM,
TensorBoard, and the Hub-ready output folder.

Accelerate does the distribution (`python script.py` or `accelerate launch [--num_processes 2 --cpu] script.py`),
mixed precision and state saving; this module only decides *what* happens at each step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType, PartialState
from accelerate.utils import DynamoBackend, TorchDynamoPlugin, compile_regions
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, enable_full_determinism, get_cosine_schedule_with_warmup

from .checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from .configuration_gpt2_scratch import GPT2ScratchConfig
from .loading import quiet_library_progress
from .memory import check_fits, processes_sharing, training_memory

BEST_MODEL = "best_model.pt"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (what was wrong, where to look) and exit status 2, not the usage text of
    every option followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by all training scripts, named as in transformers' `TrainingArguments`."""
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", required=True)
    group.add_argument("--per_device_train_batch_size", type=int, default=8)
    group.add_argument("--per_device_eval_batch_size", type=int, default=None, help="default: the training size")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=6e-4)
    group.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                       help="muon: Muon for the weight matrices inside the transformer blocks, AdamW (at "
                            "--learning_rate) for embeddings, biases, norms and heads")
    group.add_argument("--muon_learning_rate", type=float, default=0.02)
    group.add_argument("--muon_ns_steps", type=int, default=5, help="Newton-Schulz iterations per Muon step")
    group.add_argument("--weight_decay", type=float, default=0.1)
    group.add_argument("--warmup_steps", type=int, default=0)
    group.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --num_train_epochs")
    group.add_argument("--num_train_epochs", type=float, default=1.0)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--full_determinism", action="store_true",
                       help="deterministic kernels only (slower): a compiled run then also resumes bit for bit "
                            "(inductor's embedding gradient otherwise adds in parallel, in no fixed order)")
    group.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no")
    group.add_argument("--torch_compile", action="store_true",
                       help="compile the training step with torch.compile (inductor; `accelerate launch "
                            "--dynamo_backend/--dynamo_mode ...` choose others): faster steps once the first has "
                            "compiled (tens of seconds); checkpoints and the saved model are the same as without")
    group.add_argument("--eval_strategy", choices=["steps", "epoch"], default="steps",
                       help="evaluate every --eval_steps steps, or at the end of every epoch (always at the end)")
    group.add_argument("--eval_steps", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    group.add_argument("--metric_for_best_model", default=None,
                       help="keep the weights with the best value of this validation metric (e.g. f1, loss) and "
                            "return to them at the end; default: keep the last weights")
    group.add_argument("--greater_is_better", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                       help="whether a larger --metric_for_best_model is better (default: yes unless it is a loss)")
    group.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: never)")
    group.add_argument("--logging_steps", type=int, default=10)
    group.add_argument("--resume_from_checkpoint", default=None,
                       help="a checkpoint folder, or 'latest': the newest one whose files match its manifest")
    group.add_argument("--max_train_minutes", type=float, default=None,
                       help="stop cleanly after this much training time (counted across resumes), and save")
    group.add_argument("--schedule_on_clock", action="store_true",
                       help="with --max_train_minutes: after warmup the cosine decay follows the clock and ends "
                            "exactly with the budget, however fast the machine runs that day; the budget then ends "
                            "the run (epochs are not counted; --max_steps, if given, caps the steps)")
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", default=None)


@dataclass(frozen=True)
class Limits:
    """The values a numeric argument accepts: from `low` to `high`, each end included unless open."""

    low: float = 0
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        low = f"{'greater than' if self.low_open else 'at least'} {self.low:g}"
        if self.high == math.inf:
            return low
        return f"{low} and {'less than' if self.high_open else 'at most'} {self.high:,}"

    def accepts(self, value: float) -> bool:
        return (value > self.low if self.low_open else value >= self.low) and (
            value < self.high if self.high_open else value <= self.high)


POSITIVE, FRACTION = Limits(1), Limits(0, 1, high_open=True)
# Every numeric argument of the training scripts, by name. One not listed must be finite and not negative. The upper
# bounds are where a larger value only hangs: Newton-Schulz iterations, generated examples, a LoRA rank beyond any
# GPT-2 matrix's smaller side (1,600), a seed numpy cannot take.
ARGUMENT_LIMITS = {
    "per_device_train_batch_size": POSITIVE, "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE, "learning_rate": Limits(0, low_open=True),
    "muon_learning_rate": Limits(0, low_open=True), "muon_ns_steps": Limits(1, 100), "weight_decay": Limits(0),
    "warmup_steps": Limits(0), "max_steps": Limits(-1), "num_train_epochs": Limits(0),
    "max_grad_norm": Limits(0, low_open=True), "seed": Limits(0, 2 ** 32 - 1), "eval_steps": Limits(0),
    "save_steps": Limits(0), "logging_steps": POSITIVE, "max_train_minutes": Limits(0, low_open=True),
    # the model (pretraining)
    "vocab_size": POSITIVE, "context_length": POSITIVE, "emb_dim": POSITIVE, "n_heads": POSITIVE,
    "n_layers": POSITIVE, "drop_rate": FRACTION, "tokenizer_vocab_size": Limits(1, 2 ** 31 - 1),
    "streaming_eval_blocks": POSITIVE, "pad_vocab_to_multiple_of": Limits(0, 4096),
    # LoRA, classification and instruction tuning
    "lora_r": Limits(1, 1600), "lora_alpha": Limits(0, low_open=True), "lora_dropout": FRACTION,
    "task_train_size": Limits(1, 10 ** 6), "task_test_size": Limits(1, 10 ** 6), "max_new_tokens": POSITIVE,
    "max_eval_examples": POSITIVE, "max_eval_samples": POSITIVE,
}


def check_numeric_arguments(args: argparse.Namespace) -> None:
    """Every number the user typed is finite and within its limits: NaN, infinity, a negative count or a zero
    learning rate is one line naming the argument, not a traceback (or a hang) later."""
    for name, value in vars(args).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {value}")
        limits = ARGUMENT_LIMITS.get(name, Limits(0))
        if not limits.accepts(value):
            raise ValueError(f"--{name} must be {limits.describe()}, got {value:g}" if isinstance(value, float)
                             else f"--{name} must be {limits.describe()}, got {value}")


def check_training_arguments(args: argparse.Namespace) -> None:
    check_numeric_arguments(args)
    if args.max_steps == 0 or (args.max_steps < 0 and args.num_train_epochs <= 0):
        raise ValueError("nothing to train: give --max_steps > 0 or --num_train_epochs > 0")
    if args.schedule_on_clock and args.max_train_minutes is None:
        raise ValueError("--schedule_on_clock needs --max_train_minutes: the budget the cosine decay ends at")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/gpt2-scratch-shakespeare)")


class Terminated(BaseException):
    """SIGTERM before the training loop (which takes stop signals itself), raised where the program is (a
    BaseException, as KeyboardInterrupt: no `except Exception` on the way turns it into an error message)."""


def raise_terminated(number: int, frame: object) -> NoReturn:
    raise Terminated


def run_script(main: Callable[[], object]) -> None:
    """Entry point of a training script: bad input is one line on stderr and exit status 2, not a traceback; Ctrl-C
    or SIGTERM before the training loop (which saves and exits by itself), while data is downloaded or tokenised
    (a token store half-built is deleted, never used), is one line and exit status 130 or 143."""
    from .sources import SourceError

    quiet_library_progress()
    on_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, raise_terminated) if on_main_thread else None
    try:
        main()
    except (ValueError, FileNotFoundError, SourceError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted before training started: nothing to save", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Terminated:
        print("stopped by SIGTERM before training started: nothing to save", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    # Several processes (torchrun, `accelerate launch --multi_gpu`) on a machine without GPUs: Accelerate joins them
    # with gloo on the CPU only when told to use the CPU; otherwise each process would train alone.
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    settings = device_settings(PartialState(cpu=cpu_processes).device)
    if args.full_determinism:
        enable_full_determinism(args.seed)
    return Accelerator(
        cpu=cpu_processes,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with="tensorboard",
        project_dir=args.output_dir,
        # The shuffling order is a function of (seed, epoch) alone, so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed,
                                                  non_blocking=settings.pin_memory),
        # Accelerate's own compile would wrap the model in torch.compile's OptimizedModule, whose state dict names
        # every tensor `_orig_mod.<name>` (checkpoints, best weights), and evaluation would run compiled too (a
        # recompilation per batch shape). The loop compiles its training step itself, with Accelerate's dynamo
        # settings (`compile_settings`).
        dynamo_plugin=TorchDynamoPlugin(backend="no"),
    )


@dataclass(frozen=True)
class DeviceSettings:
    """What a careful user sets by hand for training on a device; the loop takes them from `device_settings`."""

    tf32: bool  # float32 matmuls (those outside bf16/fp16 autocast) on TF32 tensor cores: torch's "high" precision
    fused_adamw: bool  # AdamW's update as one fused kernel per step instead of several per tensor
    pin_memory: bool  # batches in page-locked memory, copied to the GPU without blocking the step


def device_settings(device: torch.device) -> DeviceSettings:
    """On CUDA: TF32, fused AdamW, pinned memory. Elsewhere as PyTorch's defaults. (Attention needs no setting:
    training batches carry no mask, so the model calls SDPA with `is_causal=True` and no `attn_mask`, which under
    bf16 is what the flash kernel takes.)"""
    cuda = device.type == "cuda"
    return DeviceSettings(tf32=cuda, fused_adamw=cuda, pin_memory=cuda)


def compile_settings(args: argparse.Namespace) -> TorchDynamoPlugin | None:
    """How the training step is compiled, or None to run it eagerly: with --torch_compile, or when Accelerate's
    dynamo settings ask for it (`accelerate launch --dynamo_backend inductor`, `accelerate config`), which also
    choose the backend and mode for --torch_compile (default: inductor, default mode)."""
    plugin = TorchDynamoPlugin()  # the ACCELERATE_DYNAMO_* variables `accelerate launch` sets
    if plugin.backend == DynamoBackend.NO:
        if not args.torch_compile:
            return None
        plugin.backend = DynamoBackend.INDUCTOR
    return plugin


def compiled_step(model: nn.Module, plugin: TorchDynamoPlugin | None) -> nn.Module:
    """What the training step calls: `model` itself, or compiled as Accelerate's `prepare` would compile it (the
    whole prepared model, or with regional compilation its repeated blocks) without replacing it: the parameters
    are the same tensors, and `model`'s state dict keeps its names."""
    if plugin is None:
        return model
    kwargs = plugin.to_kwargs()
    return compile_regions(model, **kwargs) if plugin.use_regional_compilation else torch.compile(model, **kwargs)


class PaddedVocabulary:
    """A language model's token embeddings, and the output head tied to them, padded with rows up to a multiple of
    `multiple` for training, as transformers' `resize_token_embeddings(pad_to_multiple_of=...)` pads them: matmul
    shapes that GPU kernels tile evenly (GPT-2's 50,257 → 50,304). The padded rows' logits are cut off as the head
    computes them, so they are never predicted, weigh nothing in the loss and get no gradient; `trim()` drops the
    rows again before the model is saved. Pad before the optimizers are built (the parameters keep their identity,
    with more rows), trim after the last step."""

    def __init__(self, model: PreTrainedModel, multiple: int) -> None:
        self.model, self.vocab_size = model, model.config.vocab_size
        with torch.random.fork_rng(devices=[]):  # the new rows' initialisation must not shift the run's random stream
            model.resize_token_embeddings(pad_to_multiple_of=multiple, mean_resizing=False)
        self.hook = model.get_output_embeddings().register_forward_hook(self.real_logits)

    def real_logits(self, head: nn.Module, inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.vocab_size]

    def trim(self) -> None:
        """The model as it was before padding, with the trained rows: the first `vocab_size`."""
        self.hook.remove()
        self.model.zero_grad(set_to_none=True)  # a gradient of the padded shape would not fit the trimmed rows
        self.model.resize_token_embeddings(self.vocab_size)


def parameter_groups(model: nn.Module, weight_decay: float, skip: frozenset[int] = frozenset()) -> list[dict]:
    """Decay the matmul weights only: biases, norm scales/shifts and embeddings are not regularised towards 0.
    Parameters whose id is in `skip` are left to another optimiser."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad and id(param) not in skip:
            (no_decay if param.ndim < 2 or id(param) in embeddings else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iteration in a dtype of our choosing: torch's is bfloat16, which a CPU
    without bfloat16 instructions (AVX2 only) runs ~10x slower than float32; one with them (AVX512-BF16, AMX) ~2x
    faster. `build_optimizers` takes bfloat16 for --mixed_precision bf16 runs and float32 otherwise."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.float32, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            updates = []
            for grad, buffer in zip(grads, buffers):
                buffer.lerp_(grad, 1 - group["momentum"])
                updates.append(grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer)
            # Same-shaped matrices (every block's query, key, ...) orthogonalise as one stack: one batched matmul
            # beats many small ones (1.8x faster in bf16 for the 24 matrices of the 1-minute Shakespeare recipe).
            by_shape: dict[torch.Size, list[int]] = {}
            for index, update in enumerate(updates):
                by_shape.setdefault(update.shape, []).append(index)
            for indices in by_shape.values():
                stack = torch.stack([updates[index] for index in indices])
                orthogonal = orthogonalise(stack, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                           self.ns_dtype)
                for index, update in zip(indices, orthogonal):
                    param = params[index]
                    # torch's "original" scaling: a tall matrix's orthogonal update has smaller entries, so larger steps
                    rows, cols = param.shape
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                    param.add_(update.to(param.dtype), alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)))
        return loss


def orthogonalise(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration: pushes every singular value of `matrix` (or of each matrix in a
    stack of them, shape (..., rows, cols)) towards 1, in `dtype`."""
    a, b, c = coefficients
    tall = matrix.shape[-2] > matrix.shape[-1]
    x = matrix.to(dtype)
    x = x.mT if tall else x  # iterate on the wide side: its Gram matrix is the smaller one
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # the Frobenius norm bounds the spectral norm
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(shape)
    return x.mT if tall else x


def build_optimizers(model: nn.Module, args: argparse.Namespace, fused: bool = False) -> list[torch.optim.Optimizer]:
    """AdamW over everything; or Muon over the blocks' 2-D weight matrices and AdamW over the rest (Muon is for
    hidden layers: embeddings, the output head, biases and norms keep AdamW). `fused`: AdamW's fused kernel (Muon
    has none)."""
    adamw_fused = True if fused else None  # None: PyTorch's default implementation for the device
    if args.optimizer == "adamw":
        return [torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                                  betas=(0.9, 0.95), fused=adamw_fused)]
    hidden = [param for name, param in model.named_parameters()
              if param.requires_grad and param.ndim == 2 and ".trf_blocks." in name]
    if not hidden:
        raise ValueError("--optimizer muon: the model has no trainable weight matrices in its transformer blocks")
    rest = parameter_groups(model, args.weight_decay, skip=frozenset(id(param) for param in hidden))
    ns_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    return [Muon(hidden, ns_dtype, lr=args.muon_learning_rate, weight_decay=args.weight_decay,
                 ns_steps=args.muon_ns_steps),
            torch.optim.AdamW(rest, lr=args.learning_rate, betas=(0.9, 0.95), fused=adamw_fused)]


def check_memory(args: argparse.Namespace, config: GPT2ScratchConfig, device: torch.device,
                 model: nn.Module | None = None) -> None:
    """Refuse settings that cannot fit before anything large is allocated: before the model is built (`model` None:
    its weights count too), or once it is, before the optimizers' state and the first batch (only what is still to
    come counts, for the parameters the model really trains)."""
    batch = args.per_device_train_batch_size
    if model is None:
        needed = training_memory(config, batch, args.optimizer, args.mixed_precision, device_type=device.type)
    else:
        trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        language_model = getattr(model, "get_output_embeddings", lambda: None)() is not None
        needed = training_memory(
            config, batch, args.optimizer, args.mixed_precision, trainable=sum(p.numel() for _, p in trainable),
            hidden=sum(p.numel() for name, p in trainable if p.ndim == 2 and ".trf_blocks." in name),
            logits_width=None if language_model else 0,  # a classifier's logits are one row per text: negligible
            device_type=device.type)
        needed = {k: v for k, v in needed.items() if k != "parameters"}  # already allocated
    check_fits(needed, device, processes_sharing(device), f"for batches of {batch} x {config.context_length} tokens",
               "Lower --per_device_train_batch_size (raising --gradient_accumulation_steps keeps the batch), the "
               "context length or the model's size.")


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    history: list[dict] = field(default_factory=list)  # logged losses and evaluations, for the curve
    best_metric: float | None = None  # of --metric_for_best_model, with the step whose weights are in BEST_MODEL
    best_step: int | None = None
    seconds: float = 0.0  # training time so far, by the slowest process's clock
    decay_start: float | None = None  # with --schedule_on_clock: the training time at which warmup ended


@dataclass
class LoopResult:
    progress: Progress
    metrics: dict[str, float]
    stopped_early: bool
    seconds: float


def describe_run(args: argparse.Namespace, result: LoopResult, example: str) -> str:
    """One paragraph for the model card: steps, time, batch and optimiser settings."""
    optimizer = f"AdamW lr {args.learning_rate}" if args.optimizer == "adamw" else (
        f"Muon lr {args.muon_learning_rate} ({args.muon_ns_steps} Newton-Schulz steps) on the blocks' weight "
        f"matrices and AdamW lr {args.learning_rate} on the rest")
    return (f"{result.progress.step} optimizer steps in {result.seconds / 60:.1f} minutes"
            f"{' (stopped by --max_train_minutes)' if result.stopped_early else ''}, batch "
            f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation x {example} per "
            f"process, {optimizer} with warmup + cosine decay"
            f"{f' ending with the {args.max_train_minutes:g}-minute budget' if args.schedule_on_clock else ''}, "
            f"weight decay {args.weight_decay}, "
            f"mixed precision {args.mixed_precision}.")


def public_arguments(args: argparse.Namespace) -> dict:
    """The run's arguments for a model card or a tracker (no secrets are arguments; `push_to_hub` is not a setting)."""
    return {k: v for k, v in vars(args).items() if k != "push_to_hub"}


class Interrupted(BaseException):
    """A stop signal that ended a phase `StopSignals.interrupting` marked (a BaseException: an evaluator's
    `except Exception` must not swallow it)."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM (`kill`, a job scheduler, `docker stop`) only take note: the loop
    stops at the next optimizer step's end, saves a checkpoint and exits with 128 + the signal's number (130, 143),
    as a shell reports a process that signal ended. A repeat changes nothing: `accelerate launch` forwards a Ctrl-C
    to processes that already had it from the terminal. (SIGKILL cannot be caught: the last checkpoint remains.)
    Inside `interrupting()` a signal ends the phase at once instead, by raising `Interrupted`."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, object] = {}
        self.interruptible = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self.note)
        return self

    def note(self, number: int, frame: object) -> None:
        self.received = self.received or number
        if self.interruptible:
            self.interruptible = False
            raise Interrupted(self.received)

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """A phase that changes nothing a checkpoint holds (evaluation): a stop signal received before or during it
        raises `Interrupted` where the program is (Python runs the handler between two operations, so within a
        batch's time), rather than after the phase's end."""
        if self.received:
            raise Interrupted(self.received)
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class Clock:
    """Training time so far, counted across resumes and the same on every process (the slowest clock decides, so all
    stop together), read once per optimizer step in one collective that also tells every process whether any of them
    received a stop signal: they all stop at the same step. `now` is the time source (tests replace it with a clock
    that advances by a fixed step per read, so what depends on time is tested without timing)."""

    now: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, accelerator: Accelerator, seconds_so_far: float) -> None:
        self.accelerator = accelerator
        self.origin = self.now() - seconds_so_far

    def read(self, signal_number: int) -> tuple[float, int]:
        """(training seconds, the stop signal some process received or 0)."""
        mine = torch.tensor([self.now() - self.origin, signal_number], dtype=torch.float64,
                            device=self.accelerator.device)
        seconds, number = self.accelerator.gather(mine).view(-1, 2).max(dim=0).values.tolist()
        return seconds, int(number)


class ProgressBar:
    """tqdm over optimizer steps; under --max_train_minutes over the budget instead, with the training time elapsed
    and left (counted across resumes, as the budget is) beside the step and the loss. `plain` (output that is not a
    terminal, such as a log file): no bar, whose every redraw would be another stretch of the file, but one line each
    time the loss is logged."""

    def __init__(self, total_steps: int | None, budget_minutes: float | None, progress: Progress, enabled: bool,
                 file: IO[str] | None = None, plain: bool = False) -> None:
        self.total_steps, self.budget = total_steps, None if budget_minutes is None else budget_minutes * 60
        self.first_step, self.first_seconds, self.loss = progress.step, progress.seconds, None
        self.file, self.lines = file, enabled and plain
        enabled = enabled and not plain
        if self.budget is None:
            self.bar = tqdm(total=total_steps, initial=progress.step, disable=not enabled, desc="training", file=file)
        else:
            self.bar = tqdm(total=self.budget, initial=min(progress.seconds, self.budget), disable=not enabled,
                            desc="training", file=file, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
            self.show(progress)

    def status(self, progress: Progress) -> str:
        """The step (of how many), the time elapsed and left under a budget, and the last loss logged."""
        step = f"step {progress.step}{f'/{self.total_steps}' if self.total_steps else ''}"
        loss = "" if self.loss is None else f", loss {self.loss:.3f}"
        if self.budget is None:
            return step + loss
        left = max(self.budget - progress.seconds, 0.0)
        if self.total_steps is not None and progress.step > self.first_step:  # the steps may run out first
            per_step = (progress.seconds - self.first_seconds) / (progress.step - self.first_step)
            left = min(left, (self.total_steps - progress.step) * per_step)
        return f"{tqdm.format_interval(progress.seconds)} elapsed, {tqdm.format_interval(left)} left, {step}{loss}"

    def show(self, progress: Progress, loss: float | None = None) -> None:
        self.loss = self.loss if loss is None else loss
        if self.lines:
            if loss is not None:
                print(f"training: {self.status(progress)}", file=self.file or sys.stderr, flush=True)
            return
        if self.budget is None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(progress.step - self.bar.n)
            return
        self.bar.set_postfix_str(self.status(progress), refresh=False)
        self.bar.update(min(progress.seconds, self.budget) - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class BestWeights:
    """--metric_for_best_model: after each evaluation the weights are kept (written aside, then renamed into place)
    when the metric improves, and the loop returns to them at the end."""

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, output_dir: Path) -> None:
        self.accelerator, self.output_dir = accelerator, output_dir
        self.metric = args.metric_for_best_model
        self.greater = "loss" not in self.metric if args.greater_is_better is None else args.greater_is_better

    def consider(self, model: nn.Module, metrics: dict[str, float], progress: Progress) -> None:
        name = f"eval/{self.metric}"
        if name not in metrics:
            raise ValueError(f"--metric_for_best_model {self.metric}: the evaluation reports "
                             f"{', '.join(k.split('/')[-1] for k in metrics)}")
        best = progress.best_metric
        if best is not None and not (metrics[name] > best if self.greater else metrics[name] < best):
            return
        progress.best_metric, progress.best_step = metrics[name], progress.step
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            partial = self.output_dir / f".{BEST_MODEL}.partial"
            torch.save(self.accelerator.unwrap_model(model).state_dict(), partial)
            partial.replace(self.output_dir / BEST_MODEL)
        self.accelerator.wait_for_everyone()

    def restore(self, model: nn.Module, progress: Progress) -> dict[str, float]:
        """Load the kept weights back; returns the metrics they were kept for."""
        state = torch.load(self.output_dir / BEST_MODEL, map_location="cpu", weights_only=True)
        self.accelerator.unwrap_model(model).load_state_dict(state)
        kept = next(h for h in reversed(progress.history)
                    if h["step"] == progress.best_step and f"eval/{self.metric}" in h)
        self.accelerator.print(f"returned to the weights of step {progress.best_step} (best {self.metric} "
                               f"{progress.best_metric:.4f})")
        return {k: v for k, v in kept.items() if k.startswith("eval/")}


class TrainingLoop:
    """One optimisation run: `run()` trains, evaluates, checkpoints and returns the final metrics."""

    def __init__(
        self,
        accelerator: Accelerator,
        args: argparse.Namespace,
        model: nn.Module,
        train_dataset: torch.utils.data.Dataset,
        collate_fn: Callable,
        evaluate: Callable[[nn.Module], dict[str, float]],
        compute_loss: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    ) -> None:
        """`evaluate(model)` returns validation metrics named "eval/<name>"; `compute_loss(model, batch)` replaces
        the model's own loss (e.g. class-weighted cross-entropy)."""
        self.accelerator, self.args, self.evaluate = accelerator, args, evaluate
        self.compute_loss = compute_loss or (lambda model, batch: model(**batch).loss)
        self.output_dir = Path(args.output_dir)
        if isinstance(getattr(model, "config", None), GPT2ScratchConfig):
            check_memory(args, model.config, accelerator.device, model)
        streaming = isinstance(train_dataset, torch.utils.data.IterableDataset)
        settings = device_settings(accelerator.device)
        if settings.tf32:
            torch.set_float32_matmul_precision("high")
        # Its own generator: creating a batch iterator must not consume the global RNG that dropout draws from.
        loader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, shuffle=not streaming,
                            collate_fn=collate_fn, drop_last=True, pin_memory=settings.pin_memory,
                            generator=None if streaming else torch.Generator().manual_seed(args.seed))
        if args.optimizer == "muon" and accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("--optimizer muon orthogonalises whole weight matrices, which FSDP shards across "
                             "processes: use --optimizer adamw with FSDP")
        optimizers = build_optimizers(model, args, fused=settings.fused_adamw)
        self.model, self.loader, *self.optimizers = accelerator.prepare(model, loader, *optimizers)
        # The training step calls `step_model` (compiled with --torch_compile); evaluation, checkpoints and the script
        # take `model`, which is never compiled: its state dict keeps its names, and no evaluation batch recompiles.
        self.step_model = compiled_step(self.model, compile_settings(args))
        self.total_steps = self.count_steps(streaming)
        self.progress = Progress()
        self.best = BestWeights(accelerator, args, self.output_dir) if args.metric_for_best_model else None
        self.schedulers = [accelerator.prepare(scheduler) for scheduler in self.build_schedulers(optimizers)]
        self.signals = StopSignals()
        self.clock = Clock(accelerator, 0.0)

    def count_steps(self, streaming: bool) -> int:
        args = self.args
        if args.schedule_on_clock and args.max_steps <= 0:
            return sys.maxsize  # the clock ends the run
        if streaming:  # no length: the run is counted in steps only
            return args.max_steps
        batches_per_epoch = len(self.loader)
        if batches_per_epoch < args.gradient_accumulation_steps:
            raise ValueError(
                f"the training split gives {batches_per_epoch} batches per process, fewer than one optimizer "
                f"step ({args.gradient_accumulation_steps} accumulated batches); lower the batch size or add data"
            )
        steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
        return args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)

    def build_schedulers(self, optimizers: list[torch.optim.Optimizer]) -> list[LambdaLR]:
        if self.args.schedule_on_clock:
            def factor(counter: int) -> float:  # a plain function: LambdaLR would try to checkpoint a method's state
                return self.clock_schedule(counter)

            return [LambdaLR(optimizer, factor) for optimizer in optimizers]
        # Accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
        processes = self.accelerator.num_processes
        return [get_cosine_schedule_with_warmup(optimizer, self.args.warmup_steps * processes,
                                                self.total_steps * processes) for optimizer in optimizers]

    def clock_schedule(self, counter: int) -> float:
        """--schedule_on_clock's learning-rate factor: linear warmup over --warmup_steps (`counter` is the
        scheduler's, stepped once per process per optimizer step), then half a cosine from the end of warmup to the
        end of the budget, by training time."""
        step = counter / self.accelerator.num_processes
        if step < self.args.warmup_steps:
            return step / self.args.warmup_steps
        if self.progress.decay_start is None:
            self.progress.decay_start = self.progress.seconds
        decay_seconds = self.args.max_train_minutes * 60 - self.progress.decay_start
        done = (self.progress.seconds - self.progress.decay_start) / decay_seconds if decay_seconds > 0 else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.output_dir, self.progress.step, self.progress.__dict__)

    def resume(self, where: str) -> None:
        checkpoint, skipped = resolve_checkpoint(self.output_dir, where)
        for line in skipped:
            self.accelerator.print(line)
        self.progress = Progress(**load_checkpoint(self.accelerator, checkpoint))
        self.accelerator.print(f"resumed from {checkpoint} at step {self.progress.step}")

    def log(self, values: dict[str, float]) -> None:
        self.progress.history.append({"step": self.progress.step, **values})
        self.accelerator.log(values, step=self.progress.step)

    def out_of_time(self) -> bool:
        return self.args.max_train_minutes is not None and self.progress.seconds > self.args.max_train_minutes * 60

    def run(self) -> LoopResult:
        args, accelerator = self.args, self.accelerator
        if args.resume_from_checkpoint:
            self.resume(args.resume_from_checkpoint)
        start = time.monotonic()
        self.clock = Clock(accelerator, self.progress.seconds)  # a resumed run's clock goes on from its checkpoint's
        bar = ProgressBar(None if self.total_steps == sys.maxsize else self.total_steps, args.max_train_minutes,
                          self.progress, enabled=accelerator.is_local_main_process, plain=not sys.stderr.isatty())
        with self.signals:
            time_up = self.train(bar)
            bar.close()
            seconds = time.monotonic() - start
            if time_up:
                accelerator.print(f"--max_train_minutes {args.max_train_minutes} reached at step {self.progress.step}"
                                  + (": the learning rate has decayed to its end" if args.schedule_on_clock else
                                     f" of {self.total_steps}: stopped before the schedule's end"))
            metrics = self.run_evaluation()
            _, number = self.clock.read(self.signals.received)  # a stop asked for during the final evaluation
            if number:
                self.stop(number, self.save_checkpoint())
        if self.best and self.progress.best_step != self.progress.step:
            metrics = self.best.restore(self.model, self.progress)
        stopped_early = time_up and not args.schedule_on_clock  # on the clock, the budget is the planned end
        return LoopResult(self.progress, metrics, stopped_early, seconds)

    def close(self) -> None:
        """The end of a script, on every process: wait for the others, let go of the DDP-wrapped model, then close
        the trackers and the process group. In that order because DDP's reducer can hold the last reference to
        gloo's process group: freed after `end_training()`, it joins gloo's threads while holding the GIL that a
        thread finishing its last work waits for, and the process hangs (seen once after a two-process run; py-spy
        showed `~ProcessGroupGloo` under `Reducer` dealloc; pytorch/pytorch#56297)."""
        self.accelerator.wait_for_everyone()
        self.model = self.step_model = self.loader = None
        self.optimizers, self.schedulers = [], []
        self.accelerator.free_memory()  # the accelerator's own references
        gc.collect()  # the wrapper and its hooks may form cycles: collected now, while the process group lives
        self.accelerator.end_training()

    def train(self, bar: ProgressBar) -> bool:
        """Optimizer steps up to the planned end; True when the time budget ended them first. A stop signal ends
        them at the next step's end with a checkpoint and the process's exit (`stop`)."""
        args, accelerator = self.args, self.accelerator
        running_loss, running_batches = 0.0, 0
        self.model.train()
        while self.progress.step < self.total_steps:
            self.loader.set_epoch(self.progress.epoch)
            batches = accelerator.skip_first_batches(self.loader, self.progress.batches_in_epoch) \
                if self.progress.batches_in_epoch else self.loader
            for batch in batches:
                loss, stop_signal = self.micro_step(batch)
                self.progress.batches_in_epoch += 1
                running_loss, running_batches = running_loss + loss, running_batches + 1
                if not accelerator.sync_gradients:
                    continue
                self.progress.step += 1
                if self.progress.step % args.logging_steps == 0:
                    train_loss = running_loss / running_batches
                    self.log({"train/loss": train_loss, "train/lr": self.schedulers[-1].get_last_lr()[0]})
                    running_loss, running_batches = 0.0, 0
                    bar.show(self.progress, train_loss)
                else:
                    bar.show(self.progress)
                if args.eval_steps and self.progress.step % args.eval_steps == 0 \
                        and self.progress.step < self.total_steps:
                    self.run_evaluation()
                time_up = self.out_of_time() and self.progress.step < self.total_steps
                checkpoint = None
                if stop_signal or args.save_steps and (self.progress.step % args.save_steps == 0 or time_up):
                    checkpoint = self.save_checkpoint()
                if stop_signal:
                    self.stop(stop_signal, checkpoint)
                if time_up:
                    return True
                if self.progress.step >= self.total_steps:
                    return False
            # the epoch ran out
            self.progress.epoch += 1
            self.progress.batches_in_epoch = 0
            if args.eval_strategy == "epoch" and self.progress.step < self.total_steps:
                self.run_evaluation()
        return False

    def micro_step(self, batch: dict) -> tuple[float, int]:
        """Forward and backward on one batch; at the last batch of an accumulation, clip, read the clock and step.
        Returns the batch's loss and the stop signal some process received (0: none; read at optimizer steps)."""
        accelerator, stop_signal = self.accelerator, 0
        with accelerator.accumulate(self.model):
            loss = self.compute_loss(self.step_model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
                # before the schedulers step: --schedule_on_clock reads the time
                self.progress.seconds, stop_signal = self.clock.read(self.signals.received)
            for optimizer, scheduler in zip(self.optimizers, self.schedulers):
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        return loss.detach().float().item(), stop_signal

    def stop(self, number: int, checkpoint: Path, during: str = "") -> NoReturn:
        """The end of a run a signal stopped: one line saying how to go on, and the shell's status for the signal."""
        if self.accelerator.is_main_process:
            print(f"stopped by {signal.Signals(number).name}{during} after step {self.progress.step}: saved "
                  f"{checkpoint}; to go on, run the same command with --resume_from_checkpoint latest",
                  file=sys.stderr, flush=True)
        raise SystemExit(128 + number)

    def run_evaluation(self) -> dict[str, float]:
        """Evaluate, log and keep the best weights. With one process a stop signal ends the evaluation at once: the
        run saves at the last completed step and exits (`stop`). With several, the signal waits for the evaluation's
        end, so that every process leaves it at the same point and their collectives stay in step."""
        self.model.eval()
        alone = self.accelerator.num_processes == 1
        try:
            with torch.no_grad(), self.accelerator.autocast(), \
                    self.signals.interrupting() if alone else contextlib.nullcontext():
                metrics = self.evaluate(self.accelerator.unwrap_model(self.model))
        except Interrupted as stopped:
            self.stop(stopped.number, self.save_checkpoint(), " during the evaluation")
        self.model.train()
        self.log(metrics)
        self.accelerator.print(f"step {self.progress.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.best:
            self.best.consider(self.model, metrics, self.progress)
        return metrics
