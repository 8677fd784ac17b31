"""Score a base, adapter or merged thinker on an AVQA-layout split: `echoink-lite eval`.

What: every usable row of the split is prompted exactly as in training (the shared prompt path in
``prompting``), the completion is generated (greedy by default, the paper's sampling with ``--sample``),
the option letter is parsed and compared with the gold letter. One JSON line per (row, sample) goes to a
predictions file; a summary table is printed and written beside it as ``<stem>.summary.json``.

Why it is built this way:

- **Strict parsing by default.** The original took the first standalone A-D letter when no ``<answer>``
  tag was found, so the English word "a" counted as answer A. ``--lenient`` reproduces that rule for
  comparison with the paper's numbers; the summary always says which rule produced a number.
- **Resumable.** A 1,911-row evaluation of a 7B model takes hours on a Colab GPU that may vanish. Lines are
  flushed after each batch; a rerun with the same ``--out`` skips the (row, sample) pairs already written
  for the same label and counts them in the metrics. Each line carries a short hash of the settings that
  shape a completion (model, adapter, decoding, media caps, parse rule); a rerun with other settings
  refuses to mix its lines with the old ones instead of silently reporting a blend. The adapter enters
  that hash by its content (``adapters.adapter_content_hash``), not its path: training again into the same
  run folder must not be answered with the old adapter's predictions.
- **The base the adapter was trained on.** Without ``--model`` the base is the one the adapter's own
  ``adapter_config.json`` names, and the command says so. The base is loaded with the quantization the
  adapter was trained on (NF4 for a QLoRA run, read from the run's ``recipe.yaml``), since the adapter
  learned to correct that base's weights; ``--quantization nf4|none`` overrides it. The summary prints
  which was used. The adapter is checked against the base before PEFT loads it
  (``adapters.check_adapter_fits``).
- **Bad rows are counted, never dropped silently.** Rows the data scan rejects, rows whose media fail to
  decode, and prompts over ``max_prompt_tokens`` are reported per reason; accuracy is over the rows that
  were evaluated, and the bad-row counts sit next to it in the table and the summary.
- **Base vs adapter in one run.** ``--compare-base`` scores the base model with the LoRA adapter switched
  off (``PeftModel.disable_adapter()``: the same weights in memory, no second copy) and then the adapter,
  into one predictions file under the labels "base" and "adapter", and prints the difference.
- **The training's rollout engine** (``rollout.py``) decodes: the same sampling code as training, the
  towers once per row, no field of the checkpoint's ``generation_config`` read; greedy decoding is
  token-identical to transformers' ``generate`` (tests/test_rollout.py).
- **K samples.** ``--samples K`` (with ``--sample``) draws K completions per row in the same decode batch; accuracy is reported as the mean over all samples with the spread (standard deviation) of the
  per-sample-index accuracies. Sampling is seeded once before the loop; a resumed sampled run is a valid
  draw but not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_base_model, adapter_content_hash, load_adapter, training_quantization
from .answer_protocol import format_ok, parse_answer
from .data import DataError, Row, RowEncodeError, enforce_bad_fraction, scan_split
from .modeling import (
    ModelLoadError,
    default_device,
    load_processor,
    load_thinker,
    multimodal_token_ids,
    torch_dtype,
)
from .progress import phase_progress
from .prompting import encode_row
from .rollout import RolloutEngine, SamplingParams
from .safe_output import EVAL_SUMMARY, PREDICTIONS, check_output_file, write_json_output
from .thinker_forward import encode_prompts

PAPER_TEMPERATURE, PAPER_TOP_P = 1.0, 0.95


class EvalError(ValueError):
    """Evaluation settings that cannot work together; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


QUANTIZATION_CHOICES = ("auto", "nf4", "none")


@dataclass
class EvalConfig:
    model: str | None = None  # base checkpoint (Hub id or folder); None: the adapter's base_model_name_or_path
    adapter: str | None = None  # saved LoRA adapter folder, applied on `model`
    merged: str | None = None  # merged checkpoint folder, loaded instead of `model`
    data: str = "data/avqa/valid"  # split folder or its JSON list
    out: str | None = None  # predictions JSONL; default <adapter or merged dir or ./eval>/predictions.jsonl
    batch_size: int = 8  # rows per generate call (each repeated `samples` times)
    max_new_tokens: int = 768
    do_sample: bool = False
    temperature: float = PAPER_TEMPERATURE
    top_p: float = PAPER_TOP_P
    top_k: int = 50
    samples: int = 1  # K completions per row
    seed: int = 0
    lenient: bool = False
    max_audio_seconds: float = 10.0
    max_pixels: int = 256 * 28 * 28
    max_prompt_tokens: int = 4096
    limit: int | None = None  # first N usable rows
    max_bad_fraction: float = 1.0  # eval reports bad rows; raise the bar with a lower value
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    quantization: str = "auto"  # of the base: "auto" (as the adapter was trained, else none), "nf4" or "none"
    compare_base: bool = False
    device: str | None = None
    cuda_graph: bool = True  # the rollout engine's CUDA-graph decode (falls back to eager by itself)

    def __post_init__(self) -> None:
        if self.adapter and self.merged:
            raise EvalError(
                "--adapter and --merged are alternatives: a merged checkpoint already contains the adapter. "
                "Pass --adapter DIR (with --model BASE) or --merged DIR, not both."
            )
        if self.compare_base and not self.adapter:
            raise EvalError("--compare-base needs --adapter (the base is scored with that adapter switched off)")
        if self.samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise EvalError("--samples, --batch-size and --max-new-tokens must be at least 1")
        if self.samples > 1 and not self.do_sample:
            raise EvalError(f"--samples {self.samples} needs --sample: greedy decoding gives {self.samples} identical completions")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit must be at least 1, got {self.limit}")
        if self.dtype is not None and self.dtype not in ("bfloat16", "float16", "float32"):
            raise EvalError(f"--dtype must be bfloat16, float16 or float32, not {self.dtype!r}")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise EvalError(f"--quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, not {self.quantization!r}")

    @property
    def parse_rule(self) -> str:
        return "lenient" if self.lenient else "strict"

    def resolved_device(self) -> torch.device:
        return torch.device(self.device) if self.device else default_device()

    def resolved_dtype(self) -> str:
        if self.dtype:
            return self.dtype
        return "bfloat16" if self.resolved_device().type == "cuda" else "float32"

    def predictions_path(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path(self.adapter or self.merged or "eval") / "predictions.jsonl"

    def resolved_model(self) -> tuple[str | None, str]:
        """(base model, where it came from); see `resolve_base_model`."""
        return resolve_base_model(self.model, self.adapter, self.merged)

    def base_quantization(self):
        """(QuantizationSection or None, description); see `resolve_quantization`."""
        return resolve_quantization(self.quantization, None if self.merged else self.adapter)


def resolve_base_model(model: str | None, adapter: str | None, merged: str | None) -> tuple[str | None, str]:
    """(base model, where it came from). Without `model` an adapter's base is the one its own
    adapter_config.json names; a merged folder needs none (its processor may come from `model`)."""
    if model:
        return model, "--model"
    if adapter:
        base = adapter_base_model(adapter)
        if not base:
            raise EvalError(f"--model not given, and {Path(adapter) / 'adapter_config.json'} names no base_model_name_or_path. "
                            "Fix: pass --model with the base the adapter was trained on.")
        return base, f"{Path(adapter) / 'adapter_config.json'}"
    if merged:
        return None, "--merged"
    raise EvalError("nothing to evaluate: pass --model BASE (Hub id or folder), --adapter DIR (its base is read from "
                    "its adapter_config.json) or --merged DIR")


def resolve_quantization(choice: str, adapter: str | None):
    """(QuantizationSection or None, description) of the base the adapter is applied on.

    "auto": as the adapter was trained, read from its run's recipe.yaml (RUN/recipe.yaml beside RUN/adapter
    or RUN/checkpoints/step-N/adapter); without an adapter, or without that file, unquantized. "nf4": the
    kit's QLoRA default (4-bit NF4, double quantization). "none": unquantized.
    """
    from .recipe import QuantizationSection

    if choice == "nf4":
        return QuantizationSection(load_in_4bit=True), "nf4 (--quantization nf4)"
    if choice == "none" or not adapter:
        return None, "none" + (" (--quantization none)" if choice == "none" else "")
    section, recipe_file = training_quantization(adapter)
    if recipe_file is None:
        return None, (f"none (default: no recipe.yaml beside {adapter} or its run folder; pass --quantization nf4 "
                      "if it was trained on a 4-bit base)")
    if not section.load_in_4bit:
        return None, f"none, as trained ({recipe_file})"
    return section, f"{section.quant_type}, as trained ({recipe_file})"


def _quantization_label(section) -> str:
    return "none" if section is None else f"{section.quant_type}:{section.model_dump_json()}"


def _weights_id(name: str | None):
    """A name for base or merged weights that changes when a local folder's weight files are rewritten
    (path, and each weight file's size and modification time; hashing many GB would take minutes)."""
    if name is None:
        return None
    p = Path(name).expanduser()
    if not p.is_dir():
        return name  # a Hub id
    files = sorted(f for f in p.iterdir() if f.suffix == ".safetensors" or f.name == "config.json")
    return [str(p.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def _source_id(path: str | None) -> str | None:
    """A stable name for a data source: the resolved path if local, else as given."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def adapter_hash(cfg: EvalConfig, label: str) -> str | None:
    """Short content hash of the adapter a label's predictions come from (None for the base)."""
    if label == "base" or not cfg.adapter:
        return None
    return adapter_content_hash(cfg.adapter)[:12]


def settings_hash(cfg: EvalConfig, label: str) -> str:
    """Short hash of everything that shapes a (row, sample) line; resumed lines must match it."""
    model = cfg.model or (adapter_base_model(cfg.adapter) if cfg.adapter else None)
    quantization, _description = cfg.base_quantization()
    settings = {
        "weights": _weights_id(cfg.merged or model),
        "adapter": adapter_hash(cfg, label),
        "data": _source_id(cfg.data),
        "max_new_tokens": cfg.max_new_tokens,
        "do_sample": cfg.do_sample,
        "sampling": [cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed] if cfg.do_sample else None,
        "parse_rule": cfg.parse_rule,
        "media": [cfg.max_audio_seconds, cfg.max_pixels],
        "dtype": cfg.resolved_dtype(),
        "quantization": _quantization_label(quantization),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def split_name(data: str | Path) -> str:
    """The name of a split for reports: its folder's name (".../avqa/valid" -> "valid"), also when given
    as the AVQA list inside it, else the file's stem. Never a local path."""
    p = Path(data)
    if p.suffix.lower() in (".json", ".jsonl"):
        return p.parent.name if p.name.startswith("omni_rl_format") and p.parent.name else p.stem
    return p.name or str(data)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def load_model(
    model: str | None,
    adapter: str | None = None,
    merged: str | None = None,
    dtype: str = "float32",
    quantization=None,
    device: str | torch.device | None = None,
    max_pixels: int = 256 * 28 * 28,
):
    """(model in eval mode, processor) for a base checkpoint, base + adapter, or a merged checkpoint.

    Shared by `eval` and `infer`. `quantization` is a recipe QuantizationSection for the base (None:
    unquantized). The adapter is checked against the loaded base before it is attached (one-line
    adapters.AdapterError on a mismatch). A merged folder is loaded as the base (thinker-only or full Omni
    both work); its processor is read from it when it holds one, else from `model`.
    """
    weights = merged or model
    if adapter:
        adapter_base_model(adapter)  # a missing or broken adapter folder fails before minutes of model loading
    try:
        processor = load_processor(weights, max_pixels=max_pixels)
    except ModelLoadError:
        if not (merged and model):
            raise
        processor = load_processor(model, max_pixels=max_pixels)
    thinker = load_thinker(weights, dtype=dtype, quantization=quantization, device=device)
    if adapter:
        thinker = load_adapter(thinker, adapter, base_name=weights,
                               fix="pass --model the base model the adapter was trained on")
    thinker.eval()
    return thinker, processor


def load_eval_model(cfg: EvalConfig):
    """(model, processor) for an EvalConfig: base, base + adapter (a PeftModel) or merged."""
    model, _source = cfg.resolved_model()
    quantization, _description = cfg.base_quantization()
    return load_model(
        model, adapter=cfg.adapter, merged=cfg.merged, dtype=cfg.resolved_dtype(),
        quantization=quantization, device=cfg.resolved_device(), max_pixels=cfg.max_pixels,
    )


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    label: str
    n_rows: int  # rows with predictions (resumed + new)
    n_samples: int  # (row, sample) predictions
    accuracy: float | None  # mean over all samples; None when nothing could be evaluated
    accuracy_per_sample: list[float]  # accuracy of sample index k over the rows, k = 0..K-1
    accuracy_mean: float | None  # mean of accuracy_per_sample
    accuracy_spread: float | None  # sample standard deviation of accuracy_per_sample (None when K = 1)
    format_failure_rate: float | None
    bad_rows: dict[str, int]  # reason -> rows
    rows_per_second: float | None  # rows generated in this run / seconds; None when all were resumed
    parse_rule: str
    predictions_path: str
    resumed_samples: int = 0
    generated_samples: int = 0
    bad_row_details: list[str] = field(default_factory=list)

    @property
    def n_bad_rows(self) -> int:
        return sum(self.bad_rows.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["n_bad_rows"] = self.n_bad_rows
        return out


def _read_done(path: Path, label: str, settings: str, adapter: str | None = None) -> dict[tuple[str, int], dict[str, Any]]:
    """Lines already written for `label`, keyed by (problem_id as text, sample). Refuses other settings;
    `adapter` (the adapter's short content hash) lets the refusal say when the adapter itself changed."""
    from .jsonl import JsonlError, read_jsonl

    done: dict[tuple[str, int], dict[str, Any]] = {}
    if not path.is_file():
        return done
    mismatched = 0
    other_adapter = None
    try:  # a last line cut short by a crash is cut from the file (strict JSONL readers); that pair runs again
        records, _ = read_jsonl(path, repair=True)
    except JsonlError as err:
        raise EvalError(str(err)) from None
    for rec in records:
        if not isinstance(rec, dict) or rec.get("label") != label:
            continue
        if rec.get("settings") != settings:
            mismatched += 1
            if adapter is not None and rec.get("adapter") not in (None, adapter):
                other_adapter = rec["adapter"]
            continue
        done[(str(rec["problem_id"]), int(rec["sample"]))] = rec
    if other_adapter is not None:
        raise EvalError(
            f"{path} holds {mismatched} '{label}' predictions of another adapter (content {other_adapter}; the adapter "
            f"is now {adapter}): it was trained or changed since. They are not reused. Fix: pass another --out, or "
            "delete the file to evaluate the new adapter there."
        )
    if mismatched:
        raise EvalError(
            f"{path} already holds {mismatched} '{label}' predictions made with other settings (model, adapter, "
            "data, decoding, media caps, dtype or parse rule differ). Resuming would mix the two runs: "
            "pass another --out, or delete the file to start over."
        )
    return done


def _open_for_append(path: Path):
    check_output_file(path, PREDICTIONS, "--out")  # only a predictions file of its own is appended to
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = False
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, 2)
            needs_newline = f.read(1) != b"\n"
    f = path.open("a", encoding="utf-8")
    if needs_newline:  # a crash mid-line: keep the next line parseable
        f.write("\n")
    return f


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def evaluate_rows(
    model,
    processor,
    rows: list[Row],
    cfg: EvalConfig,
    predictions_path: str | Path,
    label: str,
    console=None,
    *,
    bad_rows: dict[str, int] | None = None,
    bad_row_details: list[str] | None = None,
) -> EvalResult:
    """Generate, parse and score `rows` (K = cfg.samples completions each) into `predictions_path`.

    `bad_rows` / `bad_row_details` carry rows the data scan already rejected, so one result reports
    every bad row. Rows that fail to load or encode (`prompting.encode_row`: bad media, prompt too long,
    a processor error) are skipped with a one-line warning and added here.
    """
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    path = Path(predictions_path)
    settings = settings_hash(cfg, label)
    adapter = adapter_hash(cfg, label)
    done = _read_done(path, label, settings, adapter)
    bad = Counter(bad_rows or {})
    details = list(bad_row_details or [])
    tokenizer = processor.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # The training rollout's engine (same sampling code, towers once per row, no checkpoint generation_config
    # read); greedy unless cfg.do_sample.
    sampling = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, eos_id=eos_id, pad_id=pad_id, do_sample=cfg.do_sample,
        temperature=cfg.temperature if cfg.do_sample else 1.0, top_k=cfg.top_k if cfg.do_sample else 0,
        top_p=cfg.top_p if cfg.do_sample else 1.0, suppress_ids=tuple(multimodal_token_ids(tokenizer)),
    )
    engine = RolloutEngine(model, sampling, batch_size=cfg.batch_size * cfg.samples, cuda_graph=cfg.cuda_graph)
    device = _model_device(model)
    float_dtype = torch_dtype(cfg.resolved_dtype())

    # Work items: (row, sample) pairs not yet in the file, row-major, so a batch of `batch_size` rows
    # holds each row's K samples side by side (the same layout as collate(repeats=K)).
    records: dict[tuple[str, int], dict[str, Any]] = {}
    pending_rows: list[tuple[Row, list[int]]] = []
    for row in rows:
        missing = []
        for k in range(cfg.samples):
            key = (str(row.problem_id), k)
            if key in done:
                records[key] = done[key]
            else:
                missing.append(k)
        if missing:
            pending_rows.append((row, missing))
    resumed = len(records)
    if resumed:
        console.print(f"{label}: resuming, {resumed} predictions already in {escape(str(path))}", highlight=False)

    if cfg.do_sample:
        torch.manual_seed(cfg.seed)
    generated_rows = 0
    generated = 0
    seconds = 0.0
    out_file = _open_for_append(path) if pending_rows else None
    try:
        with phase_progress(f"eval {label}", total=len(pending_rows), console=console) as advance:
            for batch_rows in _chunks(pending_rows, cfg.batch_size):
                start = time.perf_counter()
                encoded, items, prompt_of = [], [], []  # items: (row, sample) per decoded sequence
                for row, missing in batch_rows:
                    try:
                        enc = encode_row(
                            processor, row, max_audio_seconds=cfg.max_audio_seconds, max_pixels=cfg.max_pixels,
                            max_prompt_tokens=cfg.max_prompt_tokens,
                        )
                    except RowEncodeError as err:  # one bad row never ends an evaluation: skip, warn, count
                        bad[err.reason] += 1
                        details.append(f"{err.reason}: {err.detail}")
                        console.print(f"[yellow]{escape(label)}: skipped row[/] {escape(err.reason)}: {escape(err.detail)}",
                                      highlight=False, soft_wrap=True)
                        continue
                    encoded.append(enc)
                    for k in missing:
                        items.append((row, k))
                        prompt_of.append(len(encoded) - 1)
                if items:
                    prompts = encode_prompts(model, encoded, device, float_dtype)
                    result = engine.generate_rows(prompts, prompt_of)
                    for note in result.notices:
                        console.print(f"[yellow]{escape(note)}[/]", highlight=False)
                    texts = [tokenizer.decode(c.tolist(), skip_special_tokens=True) for c in result.completions]
                    for (row, k), text in zip(items, texts):
                        parsed = parse_answer(text, row.letters, cfg.lenient)
                        rec = {
                            "problem_id": row.problem_id, "sample": k, "label": label, "completion": text,
                            "parsed": parsed, "gold": row.answer, "correct": parsed == row.answer,
                            "format_ok": format_ok(text), "settings": settings, "adapter": adapter,
                        }
                        out_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        records[(str(row.problem_id), k)] = rec
                    out_file.flush()
                    generated += len(items)
                    generated_rows += len({str(row.problem_id) for row, _ in items})
                seconds += time.perf_counter() - start
                advance(len(batch_rows))
    finally:
        if out_file is not None:
            out_file.close()

    # Metrics over every row of this evaluation with predictions (resumed and new).
    per_sample: list[list[bool]] = [[] for _ in range(cfg.samples)]
    formats: list[bool] = []
    evaluated_rows = set()
    for (pid, k), rec in records.items():
        per_sample[k].append(bool(rec["correct"]))
        formats.append(bool(rec["format_ok"]))
        evaluated_rows.add(pid)
    n_samples = len(formats)
    accuracy = sum(sum(s) for s in per_sample) / n_samples if n_samples else None
    acc_per_k = [sum(s) / len(s) for s in per_sample if s]
    spread = statistics.stdev(acc_per_k) if len(acc_per_k) > 1 else None
    return EvalResult(
        label=label,
        n_rows=len(evaluated_rows),
        n_samples=n_samples,
        accuracy=accuracy,
        accuracy_per_sample=acc_per_k,
        accuracy_mean=statistics.fmean(acc_per_k) if acc_per_k else None,
        accuracy_spread=spread,
        format_failure_rate=(1 - sum(formats) / n_samples) if n_samples else None,
        bad_rows=dict(bad),
        rows_per_second=(generated_rows / seconds) if generated_rows and seconds > 0 else None,
        parse_rule=cfg.parse_rule,
        predictions_path=str(path),
        resumed_samples=resumed,
        generated_samples=generated,
        bad_row_details=details,
    )


# --------------------------------------------------------------------------------------------
# A whole evaluation
# --------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def print_summary(results: list[EvalResult], console, difference_pp: float | None = None) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="evaluation")
    for name, justify in (("label", "left"), ("rows", "right"), ("accuracy", "right"), ("format failures", "right"),
                          ("bad rows", "right"), ("rows/s", "right"), ("parse rule", "left")):
        table.add_column(name, justify=justify)
    for r in results:
        acc = _pct(r.accuracy)
        if r.accuracy_spread is not None:
            acc += f" ± {100 * r.accuracy_spread:.2f} pp (K={len(r.accuracy_per_sample)})"
        bad = str(r.n_bad_rows)
        if r.bad_rows:
            bad += " (" + ", ".join(f"{k}: {v}" for k, v in r.bad_rows.items()) + ")"
        rate = "-" if r.rows_per_second is None else f"{r.rows_per_second:.2f}"
        table.add_row(r.label, str(r.n_rows), acc, _pct(r.format_failure_rate), bad, rate, r.parse_rule)
    console.print(table)
    if difference_pp is not None:
        console.print(f"adapter - base: {difference_pp:+.2f} percentage points", highlight=False)
    shown = 5
    details = results[0].bad_row_details if results else []
    for line in details[:shown]:
        console.print(f"[red]bad row[/] {escape(line)}", highlight=False)
    if len(details) > shown:
        console.print(f"... and {len(details) - shown} more bad rows; run `echoink-lite data check` to list them")
    if results:
        console.print(f"predictions: {escape(results[0].predictions_path)}", highlight=False)


def summary_path(predictions_path: str | Path) -> Path:
    p = Path(predictions_path)
    return p.with_name(p.stem + ".summary.json")


def run_eval(cfg: EvalConfig, console=None) -> dict[str, Any]:
    """Scan the split, load the model once, evaluate (base and adapter with compare_base), summarise."""
    from rich.console import Console

    console = console or Console()
    scan = scan_split(cfg.data)
    enforce_bad_fraction(scan, cfg.max_bad_fraction, "evaluation split")
    rows = scan.rows[: cfg.limit] if cfg.limit else scan.rows
    # With a limit, report the rejects among the file rows that the limit covers.
    last_index = rows[-1].index if cfg.limit else math.inf
    rejects = [r for r in scan.rejects if r.index <= last_index]
    scan_bad = dict(Counter(r.reason for r in rejects))
    scan_details = [f"{r.reason}: {r.detail}" for r in rejects]

    path = cfg.predictions_path()
    base_model, base_source = cfg.resolved_model()
    _section, quantization = cfg.base_quantization()
    if base_model and base_source != "--model":
        console.print(f"base model: {base_model} (from {base_source}; --model overrides)", highlight=False)
    label = "adapter" if cfg.adapter else "merged" if cfg.merged else "base"
    labels = ["base", label] if cfg.compare_base else [label]
    check_eval_outputs(path)
    for name in labels:  # refuse a predictions file from other settings before loading the model
        _read_done(path, name, settings_hash(cfg, name), adapter_hash(cfg, name))
    model, processor = load_eval_model(cfg)
    results: list[EvalResult] = []
    kw = dict(bad_rows=scan_bad, bad_row_details=scan_details)
    if cfg.compare_base:
        with model.disable_adapter():
            results.append(evaluate_rows(model, processor, rows, cfg, path, "base", console, **kw))
    results.append(evaluate_rows(model, processor, rows, cfg, path, label, console, **kw))

    difference_pp = None
    if cfg.compare_base and results[0].accuracy is not None and results[1].accuracy is not None:
        difference_pp = 100 * (results[1].accuracy - results[0].accuracy)
    print_summary(results, console, difference_pp)
    if not cfg.merged:
        console.print(f"base: {base_model}, quantization {quantization}", highlight=False)

    config = asdict(cfg)
    config.update(dtype=cfg.resolved_dtype(), out=str(path), model=base_model)
    summary = {
        "data": str(scan.source_file),
        "split": split_name(cfg.data),
        "base_model": base_model,
        "base_quantization": None if cfg.merged else quantization,
        "rows_in_split": scan.total,
        "rows_evaluated": len(rows),
        "parse_rule": cfg.parse_rule,
        "predictions_path": str(path),
        "results": [r.to_dict() for r in results],
        "difference_pp": difference_pp,
        "config": config,
    }
    write_json_output(summary_path(path), summary, EVAL_SUMMARY, "eval summary (beside --out)", ensure_ascii=False)
    return summary


def check_eval_outputs(path: Path) -> None:
    """Refuse (OutputError, one line) an --out, or the summary file beside it, that is not eval's own output:
    a training log, a dataset file, a file of the user's. Before the model is loaded; writes nothing."""
    check_output_file(path, PREDICTIONS, "--out")
    check_output_file(summary_path(path), EVAL_SUMMARY, "eval summary (beside --out)")


# --------------------------------------------------------------------------------------------
# Command line (wired into `echoink-lite eval` by cli.py)
# --------------------------------------------------------------------------------------------
