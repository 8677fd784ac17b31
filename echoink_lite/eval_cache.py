"""Which lines of an eval predictions file a rerun may reuse, and how they are re-scored.

`echoink-lite eval` appends one JSON line per (row, sample) to its predictions file and a rerun with the
same ``--out`` reuses them: a 1,911-row evaluation of a 7B model takes hours on a GPU that may vanish. A
line is reused for a row only when all of these match:

- its **label** ("base", "adapter", "merged", ...);
- its **settings**: a hash of everything that shapes a completion besides the row (model weights, the
  adapter's content, protocol, decoding, media caps, dtype, quantization). Lines of the same label with
  other settings make the run stop with one line (resuming would blend two evaluations);
- its **row key**: a hash of the row's content that the model sees: question, options, and the bytes of
  its image and audio (SHA-256). Editing a split in place (a question, an option, a media file) changes
  the key, so that row is generated again; the other rows are still reused.

Why a content hash of the media, not size and modification time: the data is commonly downloaded again
(Colab loses its local disk, so the notebook downloads AVQA-R1-6K afresh each session), which renews
every file's time and would throw the whole cache away, while a file replaced by one of the same size and
time would slip through. Hashing costs one more read of each media file per run (the evaluation reads each
once anyway to decode it), done once per process (`media_digest` memoises it by path, inode, size,
modification time and status-change time: a rewrite renews the last, which `touch`/`utime` cannot set back).

The gold answer is not part of the key: the model never sees it. A reused line is **re-scored** against
the row's current solution instead; when the gold changed, the corrected line is appended (``rescored_from``
names the old gold), so the file's last line for a key always agrees with the summary. The file is only
ever appended to: lines of edited rows stay in it, superseded, and are never counted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .adapters import adapter_base_model, adapter_content_hash
from .eval_protocols import EvalError

_DIGESTS: dict[tuple, str] = {}


def media_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, memoised per process by (path, inode, size, mtime, ctime)."""
    p = Path(path)
    stat = p.stat()
    memo = (str(p.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def row_key(row) -> str | None:
    """Short hash of what the model sees of a row: question, options, image bytes, audio bytes. None when a
    media file cannot be read (the row then fails to encode and is counted as a bad row)."""
    try:
        media = [media_digest(row.image_path), media_digest(row.audio_path)]
    except OSError:
        return None
    content = json.dumps([row.problem, list(row.options), media], ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def weights_id(name: str | None):
    """A name for base or merged weights that changes when a local folder's weight files are rewritten
    (path, and each weight file's size and modification time; hashing many GB would take minutes)."""
    if name is None:
        return None
    p = Path(name).expanduser()
    if not p.is_dir():
        return name  # a Hub id
    files = sorted(f for f in p.iterdir() if f.suffix == ".safetensors" or f.name == "config.json")
    return [str(p.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def adapter_hash(cfg, label: str) -> str | None:
    """Short content hash of the adapter a label's predictions come from (None for the base)."""
    if label == "base" or not cfg.adapter:
        return None
    return adapter_content_hash(cfg.adapter)[:12]


def settings_hash(cfg, label: str, decoding) -> str:
    """Short hash of everything besides the row that shapes a (row, sample) line (an EvalConfig `cfg` and its
    resolved `eval_protocols.Decoding`). The data's path is not in it: rows are matched by content."""
    model = cfg.model or (adapter_base_model(cfg.adapter) if cfg.adapter else None)
    quantization, _description = cfg.base_quantization()
    settings = {
        "weights": weights_id(cfg.merged or model),
        "adapter": adapter_hash(cfg, label),
        "protocol": cfg.protocol,
        "max_new_tokens": decoding.max_new_tokens,
        "do_sample": decoding.do_sample,
        "sampling": ([decoding.temperature, decoding.top_p, decoding.top_k, decoding.repetition_penalty, cfg.seed]
                     if decoding.do_sample else None),
        "repetition_penalty": decoding.repetition_penalty,
        "suppress_markers": decoding.suppress_markers,
        "parse_rule": cfg.parse_rule,
        "media": [cfg.max_audio_seconds, cfg.max_pixels],
        "dtype": cfg.resolved_dtype(),
        "quantization": "none" if quantization is None else f"{quantization.quant_type}:{quantization.model_dump_json()}",
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


Done = dict[tuple[str, int], dict[str, dict[str, Any]]]


def read_done(path: Path, label: str, settings: str, adapter: str | None = None) -> Done:
    """Lines already written for `label` with these settings: (problem_id as text, sample) -> row key -> line
    (the last line of a key wins). Refuses lines of the label with other settings; `adapter` (the adapter's
    short content hash) lets the refusal say when the adapter itself changed."""
    from .jsonl import JsonlError, read_jsonl

    done: Done = {}
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
        done.setdefault((str(rec["problem_id"]), int(rec["sample"])), {})[rec.get("row_key")] = rec
    if other_adapter is not None:
        raise EvalError(
            f"{path} holds {mismatched} '{label}' predictions of another adapter (content {other_adapter}; the adapter "
            f"is now {adapter}): it was trained or changed since. They are not reused. Fix: pass another --out, or "
            "delete the file to evaluate the new adapter there."
        )
    if mismatched:
        raise EvalError(
            f"{path} already holds {mismatched} '{label}' predictions made with other settings (model, adapter, "
            "protocol, decoding, media caps, dtype or parse rule differ, or an older version of the kit wrote them). "
            "Resuming would mix the two runs: pass another --out, or delete the file to start over."
        )
    return done


def cached(done: Done, problem_id, sample: int, key: str | None) -> dict[str, Any] | None:
    """The reusable line of a (row, sample) whose content hashes to `key`, or None."""
    if key is None:
        return None
    return done.get((str(problem_id), sample), {}).get(key)


def rescored(rec: dict[str, Any], gold: str) -> dict[str, Any] | None:
    """`rec` scored against `gold`, or None when its gold already is `gold`."""
    if rec.get("gold") == gold:
        return None
    return {**rec, "gold": gold, "correct": rec.get("parsed") == gold, "rescored_from": rec.get("gold")}
