"""Score a base, adapter or merged thinker on an AVQA-layout split: `echoink-lite eval`.

What: every usable row of the split is prompted under an evaluation protocol (``eval_protocols``: the kit's
own by default, the training prompt through the shared prompt path in ``prompting``; or ``echoink-base`` /
``echoink-rl``, the original's two evaluations), the completion is generated, the option letter is parsed
and compared with the gold letter. One JSON line per (row, sample) goes to a predictions file, with the
rendered prompt and the reply, so any one can be audited; a summary table (with accuracy by ``task_type``
and ``audio_type`` when the rows have them) is printed and written beside it as ``<stem>.summary.json``.

Why it is built this way:

- **Strict parsing by default.** The original took the first standalone A-D letter when no ``<answer>``
  tag was found, so the English word "a" counted as answer A. The kit's protocol counts only
  ``<answer>X</answer>``; ``--protocol echoink-base|echoink-rl`` reproduce the original's evaluation,
  parser included, for comparison with the paper's numbers. The summary always names the protocol.
- **Resumable, keyed by content.** A 1,911-row evaluation of a 7B model takes hours on a Colab GPU that may
  vanish. Lines are flushed after each batch; a rerun with the same ``--out`` reuses the lines of the same
  label, settings and row content, and re-scores them against the current gold answer (``eval_cache``).
  A rerun with other settings refuses to mix its lines with the old ones instead of silently reporting a
  blend. The adapter enters the settings by its content (``adapters.adapter_content_hash``), not its path:
  training again into the same run folder must not be answered with the old adapter's predictions.
- **The base the adapter was trained on** (``eval_model``, shared with ``infer``). Without ``--model`` the
  base is the one the adapter's own ``adapter_config.json`` names, and the command says so. The base is
  loaded with the quantization the adapter was trained on (NF4 for a QLoRA run, read from the run's
  ``recipe.yaml``), since the adapter learned to correct that base's weights; ``--quantization nf4|none``
  overrides it. The summary prints which was used. The adapter is checked against the base before PEFT
  loads it (``adapters.check_adapter_fits``).
- **Bad rows are counted, never dropped silently.** Rows the data scan rejects, rows whose media fail to
  decode, and prompts over ``max_prompt_tokens`` are reported per reason; accuracy is over the rows that
  were evaluated, and the bad-row counts sit next to it in the table and the summary.
- **Base vs adapter in one run.** ``--compare-base`` scores the base model with the LoRA adapter switched
  off (``PeftModel.disable_adapter()``: the same weights in memory, no second copy) and then the adapter,
  into one predictions file under the labels "base" and "adapter", and prints the difference.
- **The training's rollout engine** (``rollout.py``) decodes: the same sampling code as training, the
  towers once per row, no field of the checkpoint's ``generation_config`` read; greedy decoding is
  token-identical to transformers' ``generate`` (tests/test_rollout.py).
- **K samples.** ``--samples K`` (with sampled decoding) draws K completions per row in the same decode batch;
  accuracy is reported as the mean over all samples with the spread (standard deviation) of the
  per-sample-index accuracies. One sampled pass over 1,911 items has a standard error of about 0.8 points,
  which the summary states. Sampling is seeded once before the loop; a resumed sampled run is a valid
  draw but not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .answer_protocol import extract_choice, format_ok, original_gold, parse_answer
from .data import Row, RowEncodeError, enforce_bad_fraction, scan_split
from .eval_cache import adapter_hash, cached, read_done, rescored, row_key, settings_hash
from .eval_model import QUANTIZATION_CHOICES, load_model, resolve_base_model, resolve_quantization
from .eval_protocols import (
    PAPER_TEMPERATURE,
    PAPER_TOP_P,
    PROTOCOL_CHOICES,
    Decoding,
    EvalError,
    get_protocol,
    resolve_decoding,
)
from .eval_report import EvalResult, print_summary, score, split_name, summary_path
from .flag_ranges import check_flags
from .modeling import default_device, multimodal_token_ids, torch_dtype
from .progress import phase_progress
from .prompting import encode_row, render_prompt
from .rollout import RolloutEngine, SamplingParams
from .safe_output import EVAL_SUMMARY, PREDICTIONS, check_output_file, write_json_output
from .thinker_forward import encode_prompts

# Kept importable from here: the cache's reader, the protocol constants and the model loader (`eval_model`) moved
# to their own modules.
_read_done = read_done
__all__ = ["EvalConfig", "EvalError", "EvalResult", "PAPER_TEMPERATURE", "PAPER_TOP_P", "PROTOCOL_CHOICES",
           "evaluate_rows", "load_eval_model", "load_model", "print_summary", "run_eval", "summary_path"]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    model: str | None = None  # base checkpoint (Hub id or folder); None: the adapter's base_model_name_or_path
    adapter: str | None = None  # saved LoRA adapter folder, applied on `model`
    merged: str | None = None  # merged checkpoint folder, loaded instead of `model`
    data: str = "data/avqa/valid"  # split folder or its JSON list
    out: str | None = None  # predictions JSONL; default <adapter or merged dir or ./eval>/predictions[-PROTOCOL].jsonl
    batch_size: int = 8  # rows per generate call (each repeated `samples` times)
    max_new_tokens: int | None = None  # None: the protocol's (kit 768, the original's evaluation 1024)
    protocol: str = "kit"  # "kit", "echoink-base" or "echoink-rl" (eval_protocols)
    do_sample: bool = False  # the kit's protocol only: sample instead of greedy (echoink-rl always samples)
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
        protocol = get_protocol(self.protocol)
        check_flags(batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k, samples=self.samples, seed=self.seed, limit=self.limit,
                    max_audio_seconds=self.max_audio_seconds, max_pixels=self.max_pixels,
                    max_prompt_tokens=self.max_prompt_tokens, max_bad_fraction=self.max_bad_fraction)
        if protocol.sampled is not None:  # the original's protocols fix decoding and parsing
            fixed = []
            if self.lenient:
                fixed.append("--lenient (it parses with the original's extract_choice)")
            if self.do_sample and not protocol.sampled:
                fixed.append("--sample (it decodes greedily, as the original's base evaluation)")
            if (self.temperature, self.top_p, self.top_k) != (PAPER_TEMPERATURE, PAPER_TOP_P, 50):
                fixed.append("--temperature/--top-p/top_k (it samples as the original: temperature 1, top_p 0.95, "
                             "top_k from the checkpoint's generation config)" if protocol.sampled else
                             "--temperature/--top-p/top_k (it decodes greedily)")
            if fixed:
                raise EvalError(f"--protocol {self.protocol} fixes its decoding and parsing; drop " + "; ".join(fixed)
                                + ". For other settings use --protocol kit.")
        if self.adapter and self.merged:
            raise EvalError(
                "--adapter and --merged are alternatives: a merged checkpoint already contains the adapter. "
                "Pass --adapter DIR (with --model BASE) or --merged DIR, not both."
            )
        if self.compare_base and not self.adapter:
            raise EvalError("--compare-base needs --adapter (the base is scored with that adapter switched off)")
        if self.samples > 1 and not self.sampled:
            raise EvalError(f"--samples {self.samples} needs sampled decoding (--sample, or --protocol echoink-rl): "
                            f"greedy decoding gives {self.samples} identical completions")
        if self.dtype is not None and self.dtype not in ("bfloat16", "float16", "float32"):
            raise EvalError(f"--dtype must be bfloat16, float16 or float32, not {self.dtype!r}")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise EvalError(f"--quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, not {self.quantization!r}")

    @property
    def parse_rule(self) -> str:
        rule = get_protocol(self.protocol).parse_rule
        return "lenient" if self.lenient and rule == "strict" else rule

    @property
    def sampled(self) -> bool:
        fixed = get_protocol(self.protocol).sampled
        return self.do_sample if fixed is None else fixed

    def decoding(self) -> Decoding:
        """The resolved decoding (echoink-rl reads the evaluated checkpoint's generation_config.json)."""
        protocol = get_protocol(self.protocol)
        weights = None
        if protocol.sampled:  # only the sampled protocol reads the checkpoint's generation config
            weights = self.merged or self.resolved_model()[0]
        return resolve_decoding(protocol, do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, max_new_tokens=self.max_new_tokens, weights=weights)

    def resolved_device(self) -> torch.device:
        return torch.device(self.device) if self.device else default_device()

    def resolved_dtype(self) -> str:
        if self.dtype:
            return self.dtype
        return "bfloat16" if self.resolved_device().type == "cuda" else "float32"

    def predictions_path(self) -> Path:
        if self.out:
            return Path(self.out)
        name = "predictions.jsonl" if self.protocol == "kit" else f"predictions-{self.protocol}.jsonl"
        return Path(self.adapter or self.merged or "eval") / name

    def resolved_model(self) -> tuple[str | None, str]:
        """(base model, where it came from); see `resolve_base_model`."""
        return resolve_base_model(self.model, self.adapter, self.merged)

    def base_quantization(self):
        """(QuantizationSection or None, description); see `resolve_quantization`."""
        return resolve_quantization(self.quantization, None if self.merged else self.adapter)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


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


def _gold(row: Row, parse_rule: str) -> str:
    """The gold letter a row is scored against: the original's GT_RE reading under its extract_choice rule
    (where GT_RE finds no A-D tag, where the original would stop, the kit's reading), else the kit's."""
    if parse_rule == "extract_choice":
        gold = original_gold(row.solution)
        return gold if gold is not None else row.answer
    return row.answer


def _parse(parse_rule: str, completion: str, reply: str | None, row: Row) -> str | None:
    if parse_rule == "extract_choice":
        return extract_choice(reply if reply is not None else completion)
    return parse_answer(completion, row.letters, parse_rule == "lenient")


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
    protocol = get_protocol(cfg.protocol)
    decoding = cfg.decoding()
    parse_rule = cfg.parse_rule
    settings = settings_hash(cfg, label, decoding)
    adapter = adapter_hash(cfg, label)
    done = read_done(path, label, settings, adapter)
    bad = Counter(bad_rows or {})
    details = list(bad_row_details or [])
    tokenizer = processor.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # The training rollout's engine (same sampling code, towers once per row, no checkpoint generation_config
    # read: what `decoding` says is what is sampled).
    sampling = SamplingParams(
        max_new_tokens=decoding.max_new_tokens, eos_id=eos_id, pad_id=pad_id, do_sample=decoding.do_sample,
        temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p,
        repetition_penalty=decoding.repetition_penalty,
        suppress_ids=tuple(multimodal_token_ids(tokenizer)) if decoding.suppress_markers else (),
    )
    engine = RolloutEngine(model, sampling, batch_size=cfg.batch_size * cfg.samples, cuda_graph=cfg.cuda_graph)
    device = _model_device(model)
    float_dtype = torch_dtype(cfg.resolved_dtype())

    # Work items: (row, sample) pairs without a reusable line, row-major, so a batch of `batch_size` rows
    # holds each row's K samples side by side (the same layout as collate(repeats=K)).
    records: dict[tuple[str, int], dict[str, Any]] = {}
    row_of: dict[str, Row] = {}
    pending_rows: list[tuple[Row, str | None, list[int]]] = []
    rescore_lines: list[dict[str, Any]] = []
    changed_rows = 0
    for row in rows:
        key = row_key(row)
        missing = []
        for k in range(cfg.samples):
            rec = cached(done, row.problem_id, k, key)
            if rec is None:
                missing.append(k)
                continue
            fixed = rescored(rec, _gold(row, parse_rule))
            if fixed is not None:
                rescore_lines.append(fixed)
                rec = fixed
            records[(str(row.problem_id), k)] = rec
            row_of[str(row.problem_id)] = row
        if missing:
            pending_rows.append((row, key, missing))
            if any((str(row.problem_id), k) in done for k in missing):
                changed_rows += 1
    resumed = len(records)
    if resumed:
        console.print(f"{label}: resuming, {resumed} predictions already in {escape(str(path))}", highlight=False)
    if changed_rows:
        console.print(f"{label}: {changed_rows} row(s) changed since their predictions were written (question, options "
                      "or media): generated again", highlight=False)
    if rescore_lines:
        console.print(f"{label}: {len(rescore_lines)} prediction(s) re-scored against a changed gold answer", highlight=False)

    if decoding.do_sample:
        torch.manual_seed(cfg.seed)
    generated_rows = 0
    generated = 0
    seconds = 0.0
    out_file = _open_for_append(path) if pending_rows or rescore_lines else None
    try:
        for rec in rescore_lines:
            out_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        with phase_progress(f"eval {label}", total=len(pending_rows), console=console) as advance:
            for batch_rows in _chunks(pending_rows, cfg.batch_size):
                start = time.perf_counter()
                encoded, prompt_texts, items, prompt_of = [], [], [], []  # items: (row, key, sample) per sequence
                for row, key, missing in batch_rows:
                    question = protocol.prompt_text(row.problem, row.options)
                    try:
                        enc = encode_row(
                            processor, row, max_audio_seconds=cfg.max_audio_seconds, max_pixels=cfg.max_pixels,
                            max_prompt_tokens=cfg.max_prompt_tokens, question_text=question,
                            system=protocol.system_message,
                        )
                    except RowEncodeError as err:  # one bad row never ends an evaluation: skip, warn, count
                        bad[err.reason] += 1
                        details.append(f"{err.reason}: {err.detail}")
                        console.print(f"[yellow]{escape(label)}: skipped row[/] {escape(err.reason)}: {escape(err.detail)}",
                                      highlight=False, soft_wrap=True)
                        continue
                    encoded.append(enc)
                    prompt_texts.append(render_prompt(processor, question, protocol.system_message))
                    for k in missing:
                        items.append((row, key, k))
                        prompt_of.append(len(encoded) - 1)
                if items:
                    prompts = encode_prompts(model, encoded, device, float_dtype)
                    result = engine.generate_rows(prompts, prompt_of)
                    for note in result.notices:
                        console.print(f"[yellow]{escape(note)}[/]", highlight=False)
                    for (row, key, k), ids, p in zip(items, result.completions, prompt_of):
                        text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
                        reply = None
                        if parse_rule == "extract_choice":  # what the original parses: prompt and reply, decoded
                            full = torch.cat([encoded[p].input_ids, ids.to(encoded[p].input_ids.dtype)])
                            reply = processor.batch_decode(full[None], skip_special_tokens=True)[0]
                        parsed = _parse(parse_rule, text, reply, row)
                        gold = _gold(row, parse_rule)
                        rec = {
                            "problem_id": row.problem_id, "sample": k, "label": label, "completion": text,
                            "parsed": parsed, "gold": gold, "correct": parsed == gold,
                            "format_ok": format_ok(text), "protocol": cfg.protocol, "prompt": prompt_texts[p],
                            **({"reply": reply} if reply is not None else {}),
                            "task_type": row.task_type, "audio_type": row.audio_type,
                            "row_key": key, "settings": settings, "adapter": adapter,
                        }
                        out_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        records[(str(row.problem_id), k)] = rec
                        row_of[str(row.problem_id)] = row
                    out_file.flush()
                    generated += len(items)
                    generated_rows += len({str(row.problem_id) for row, _, _ in items})
                seconds += time.perf_counter() - start
                advance(len(batch_rows))
    finally:
        if out_file is not None:
            out_file.close()

    # Metrics over every row of this evaluation with predictions (resumed and new).
    return EvalResult(
        label=label,
        **score(records, row_of, cfg.samples, decoding.do_sample),
        bad_rows=dict(bad),
        rows_per_second=(generated_rows / seconds) if generated_rows and seconds > 0 else None,
        parse_rule=parse_rule,
        predictions_path=str(path),
        resumed_samples=resumed,
        generated_samples=generated,
        bad_row_details=details,
        protocol=cfg.protocol,
        decoding=decoding.describe(),
        rescored_samples=len(rescore_lines),
        changed_rows=changed_rows,
    )


# --------------------------------------------------------------------------------------------
# A whole evaluation
# --------------------------------------------------------------------------------------------


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
    protocol, decoding = get_protocol(cfg.protocol), cfg.decoding()
    check_eval_outputs(path)
    for name in labels:  # refuse a predictions file from other settings before loading the model
        read_done(path, name, settings_hash(cfg, name, decoding), adapter_hash(cfg, name))
    model, processor = load_eval_model(cfg)
    console.print(f"protocol {protocol.name}: {protocol.description}", highlight=False, soft_wrap=True)
    console.print(f"decoding: {decoding.describe()} ({decoding.source})", highlight=False, soft_wrap=True)
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
    if protocol.differences:
        console.print(f"still differs from the original's evaluation: {len(protocol.differences)} points, listed in the "
                      "summary JSON (protocol.differences) and docs/reproduction.md", highlight=False)

    config = asdict(cfg)
    config.update(dtype=cfg.resolved_dtype(), out=str(path), model=base_model, max_new_tokens=decoding.max_new_tokens)
    summary = {
        "data": str(scan.source_file),
        "split": split_name(cfg.data),
        "evaluated_model": cfg.merged or base_model,
        "base_model": base_model,
        "base_quantization": None if cfg.merged else quantization,
        "rows_in_split": scan.total,
        "rows_evaluated": len(rows),
        "protocol": {"name": protocol.name, "description": protocol.description, "decoding": decoding.describe(),
                     "decoding_source": decoding.source, "system_message": protocol.system_message,
                     "parse_rule": cfg.parse_rule, "differences": list(protocol.differences)},
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

