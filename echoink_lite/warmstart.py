"""A short supervised warm start for the offline tiny model (the demo), so it emits the answer format.

The real Qwen2.5-Omni already writes `<think>...</think><answer>X</answer>` when asked; a randomly
initialised tiny model does not, and GRPO cannot learn from groups whose rewards are all zero. So the
demo first fine-tunes the tiny model on targets with the correct `<think>` (what the picture and the sound
are) but a UNIFORMLY RANDOM answer letter: it learns the format and the perception, not the decision, and
its validation accuracy stays at chance. The decision is what GRPO then has to learn: warm-starting with the
correct letters was tried and left GRPO nothing to do.

250 steps, not fewer: measured on the demo's data, 150 steps taught the colour but left the pitch at
chance (the `<think>` named the right pitch for 64 of 128 validation items); 250 steps named both right for
all 128, with the answer letter still at chance (32/128).

Each prompt is encoded once (the Whisper extractor pads every clip to 30 s, so this is the slow part) and
reused across steps. Both the encoding and the steps show progress with an ETA (`progress.phase_progress`).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .data import load_example, scan_split
from .modeling import load_processor, load_thinker
from .progress import phase_progress
from .prompting import collate, encode_example
from .synth import SYNTH_CLASSES

WARM_START_KIND = "demo warm start"


def random_letter_target(true_letter: str, rng: random.Random) -> str:
    colour, pitch = SYNTH_CLASSES[true_letter]
    return f"<think>{colour} {pitch}</think><answer>{rng.choice(sorted(SYNTH_CLASSES))}</answer>"


def warm_start(base_dir: str | Path, train_split: str | Path, out_dir: str | Path, steps: int = 250, batch_size: int = 32,
               lr: float = 1e-3, seed: int = 0, max_audio_seconds: float = 1.0, console=None) -> Path:
    """Full fine-tune of a small fp32 thinker on format targets; saves a model folder to `out_dir`.
    Progress goes to `console` (a new rich Console by default; `Console(quiet=True)` silences it)."""
    from rich.console import Console

    from .safe_output import check_output_folder, replacing_folder

    console = console or Console()
    check_output_folder(out_dir, WARM_START_KIND, "warm start out_dir")  # before the training, not after it
    rng = random.Random(seed)
    torch.manual_seed(seed)
    processor = load_processor(str(base_dir))
    tok = processor.tokenizer
    model = load_thinker(str(base_dir), dtype="float32", device="cpu")
    model.requires_grad_(True)
    # The towers stay trainable too: they must learn to tell red from blue and low from high.
    model.train()
    rows = scan_split(train_split).rows
    encoded = []
    with phase_progress("warm start: encode prompts", total=len(rows), console=console) as advance:
        for r in rows:
            encoded.append(encode_example(processor, load_example(r, max_audio_seconds)))
            advance(1)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    with phase_progress("warm start", total=steps, console=console) as advance:
        for _ in range(steps):
            idx = [rng.randrange(len(rows)) for _ in range(batch_size)]
            targets = [torch.tensor(tok(random_letter_target(rows[i].answer, rng)).input_ids + [eos]) for i in idx]
            width = max(t.numel() for t in targets)
            comp = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            for j, t in enumerate(targets):
                comp[j, : t.numel()] = t
            batch = collate([encoded[i] for i in idx], 1, tok.pad_token_id, completions=list(comp))
            labels = torch.full_like(batch["input_ids"], -100)
            labels[:, -width:] = torch.where(comp == tok.pad_token_id, -100, comp)
            loss = model(**batch, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            advance(1, note=f"loss {loss.item():.3f}")
    with replacing_folder(out_dir, WARM_START_KIND, "warm start out_dir") as tmp:  # whole, over its own output only
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return Path(out_dir)
