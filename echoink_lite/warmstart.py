"""A short supervised warm start for the offline tiny model (the demo), so it emits the answer format.

The real Qwen2.5-Omni already writes `<think>...</think><answer>X</answer>` when asked; a randomly
initialised tiny model does not, and GRPO cannot learn from groups whose rewards are all zero. So the
demo first fine-tunes the tiny model on targets with the correct `<think>` (what the picture and the sound
are) but a UNIFORMLY RANDOM answer letter: it learns the format and the perception, not the decision, and
its validation accuracy stays at chance. The decision is what GRPO then has to learn: warm-starting with the
correct letters was tried and left GRPO nothing to do.

250 steps, not fewer: measured on the demo's data, 150 steps taught the colour but left the pitch at
chance (the `<think>` named the right pitch for 64 of 128 validation items); 250 steps named both right for
all 128, with the answer letter still at chance (32/128). With the Hub-layout tokenizer, whose tags are 5-6
tokens each, 250 steps still named colour and pitch right for all 128 (2026-12-04).

Each prompt is encoded once and reused across steps. Both the encoding and the steps show progress with an
ETA (`progress.phase_progress`). The result is saved in the base's layout (`save_like_base`): from a
complete Omni checkpoint (the Hub layout of `echoink-lite tiny`) a complete one, talker and token2wav
copied, so that GRPO, evaluation and merge then load what users load.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .data import scan_split
from .modeling import load_processor, load_thinker
from .progress import phase_progress
from .prompting import collate, encode_example
from .row_media import load_example
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
        save_like_base(model, processor, base_dir, tmp)
    return Path(out_dir)


def save_like_base(thinker, processor, base_dir: str | Path, out_dir: str | Path) -> Path:
    """Save a fine-tuned thinker in the layout of `base_dir`: thinker-only (with the processor saved by
    transformers) from a thinker-only base; from a complete Qwen2.5-Omni base, the complete model with this
    thinker, the base's talker and token2wav, shards of the base's size, and every other file of the base
    (tokenizer and processor files, spk_dict.pt) copied as they are."""
    import shutil

    from transformers import Qwen2_5OmniForConditionalGeneration

    from .modeling import resolve_thinker_config
    from .safe_output import FOLDER_MARKER

    base, out = Path(base_dir), Path(out_dir)
    if not resolve_thinker_config(str(base))[1]:
        thinker.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        return out
    full = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32, device_map="cpu")
    full.thinker.load_state_dict(thinker.state_dict())
    shard = max(f.stat().st_size for f in base.glob("*.safetensors"))
    full.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    written = {"config.json", "generation_config.json", "model.safetensors.index.json", FOLDER_MARKER}
    for f in sorted(base.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name not in written:
            shutil.copy2(f, out / f.name)
    return out
