#!/usr/bin/env python
"""Encode time per row with the Hub processor: audio features padded to 300 s vs cut to the clip.

    python benchmarks/bench_encode.py [--model DIR] [--rows 20] [--audio-seconds 10] [--out FILE.json]

The Qwen/Qwen2.5-Omni-7B processor (its preprocessor_config.json) pads every clip to 300 s before the
Whisper log-mel extraction; `echoink_lite.prompting.processor_call` pads only just past the clip and keeps
the clip's frames (bit-identical, tests/test_audio_trim.py). This measures one row's processor call (chat
template text, a 448x448 image under the kit's default 256*28*28 pixel cap, and the clip) both ways, in
alternation, so that a shared machine's load hits both alike; report the ratio rather than the absolute
times. Without --model the processor files come from `echoink-lite tiny` (the Hub's files), built in a
temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from echoink_lite.modeling import load_processor
    from echoink_lite.prompting import processor_call, render_prompt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a checkpoint folder with the processor files (default: a tiny Hub-layout one)")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--audio-seconds", type=float, default=10.0, help="clip length (AVQA clips are about 10 s)")
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from echoink_lite.tiny import build_tiny_omni

            model = str(build_tiny_omni(Path(tmp) / "tiny"))
        processor = load_processor(model, max_pixels=256 * 28 * 28)
    rng = np.random.default_rng(0)
    text = render_prompt(processor, "What is making the sound? Options:\nA. a dog\nB. a car\n")
    n = int(args.audio_seconds * 16000)
    times: dict[str, list[float]] = {"padded_300s": [], "cut_to_clip": []}
    frames = {}
    for i in range(args.rows + 1):  # the first round warms up both paths and is not counted
        audio = (0.1 * rng.standard_normal(n)).astype(np.float32)
        image = Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8))
        for name, trim in (("padded_300s", False), ("cut_to_clip", True)):
            t = time.perf_counter()
            out = processor_call(processor, text, image, audio, trim_audio=trim)
            if i:
                times[name].append(time.perf_counter() - t)
            frames[name] = int(out["input_features"].shape[-1])
    report = {
        "rows": args.rows, "audio_seconds": args.audio_seconds, "feature_frames": frames,
        "seconds_per_row": {k: {"mean": statistics.mean(v), "median": statistics.median(v)} for k, v in times.items()},
        "ratio_padded_over_cut_median": statistics.median(times["padded_300s"]) / statistics.median(times["cut_to_clip"]),
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "processor_files": model if args.model else "echoink-lite tiny (the Hub's preprocessor_config.json)",
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
