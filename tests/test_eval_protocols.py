"""The paper's two evaluations (`eval --protocol echoink-base|echoink-rl`), pinned against the original's code
(HarryHsing/EchoInk, commit 3f6d16a, src/omniInstruct-v1_eval_valid.py): prompt text and chat rendering,
decoding (with what the checkpoint's generation config supplies), `extract_choice`, the breakdowns of
src/omniInstruct-v1_cal_metrics_valid.py, and a full-layout Omni checkpoint evaluated from the command line."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from echoink_lite import evaluate
from echoink_lite.answer_protocol import extract_choice, original_gold, parse_answer
from echoink_lite.cli import main
from echoink_lite.data import scan_split
from echoink_lite.eval_protocols import PROTOCOLS, EvalError, resolve_decoding
from echoink_lite.evaluate import EvalConfig, evaluate_rows, load_eval_model, run_eval
from echoink_lite.prompting import build_messages, encode_row, render_prompt
from echoink_lite.rollout import RolloutEngine, RolloutResult, SamplingParams, sample_next
from echoink_lite.row_media import load_example

OPTIONS = ["A. Playing the violin", "B. Singing", "C. Playing the piano", "D. Drumming"]

# ---- The original's prompt strings and regexes, verbatim from src/omniInstruct-v1_eval_valid.py --------------
ORIGINAL_RL_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Make sure to carefully consider both the visual and audio information before answering. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer between the <answer> </answer> tags."
)
ORIGINAL_BASE_TEMPLATE = (
    "{Question}\n"
    "Please answer the following question based on the given image and audio."
)
ORIGINAL_TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
}
ORIGINAL_GT_RE = re.compile(r"<answer>\s*([A-D])\s*</answer>", re.I)


def original_conversation(ex: dict, img_path: str, aud_path: str, base_model: bool) -> list[dict]:
    """The original's construction of one item's conversation (its loop body, BASE_MODEL = base_model)."""
    question_text = ex["problem"] + "\n" + "\n".join(ex["options"])
    template = ORIGINAL_BASE_TEMPLATE if base_model else ORIGINAL_RL_TEMPLATE
    prompt = template.format(Question=question_text) + ORIGINAL_TYPE_TEMPLATE["multiple choice"]
    user = {"role": "user", "content": [
        {"type": "image", "image": img_path},
        {"type": "audio", "audio": aud_path},
        {"type": "text", "text": prompt},
    ]}
    if base_model:
        return [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}, user]
    return [user]


def original_extract_choice(reply: str) -> str:
    """The original's extract_choice, step for step: after the first "\\nassistant", the <answer> tag's A-D
    letter, else the first standalone A-D letter (both case-insensitive, upper-cased), else "?"."""
    if "\nassistant" in reply:
        reply = reply.split("\nassistant", 1)[1].strip()
    m = re.search(r"<answer>\s*([A-D])\s*</answer>", reply, re.I)
    if m:
        return m.group(1).upper()
    m = re.search(r"\b([A-D])\b", reply, re.I)
    if m:
        return m.group(1).upper()
    return "?"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=4000, color_system=None)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_dir, synth_dir):
    return load_eval_model(EvalConfig(model=str(tiny_model_dir), data=str(synth_dir / "valid")))


@pytest.mark.parametrize("protocol,base_model", [("echoink-base", True), ("echoink-rl", False)])
def test_rendered_prompt_is_the_originals(loaded, synth_dir, protocol, base_model):
    _model, processor = loaded
    p = PROTOCOLS[protocol]
    ex = {"problem": "What is the man in the picture doing?", "options": OPTIONS}
    original = processor.apply_chat_template(original_conversation(ex, "images/x.jpg", "audios/x.wav", base_model),
                                             add_generation_prompt=True, tokenize=False)
    ours = render_prompt(processor, p.prompt_text(ex["problem"], ex["options"]), p.system_message)
    assert ours == original
    # The messages themselves, too: the base protocol's explicit system turn renders the same text as the
    # template's default one, so only the structure shows it is there. (The kit leaves out the media paths:
    # the processor gets the decoded media, and a path would only change keys the template never prints.)
    conv = original_conversation(ex, "images/x.jpg", "audios/x.wav", base_model)
    without_paths = [{"role": m["role"], "content": [{k: v for k, v in c.items() if k in ("type", "text")}
                                                     for c in m["content"]]} for m in conv]
    assert build_messages(p.prompt_text(ex["problem"], ex["options"]), p.system_message) == without_paths
    assert " Options:" not in ours  # the evaluation's question text differs from training's
    assert ours.index("<|IMAGE|>") < ours.index("<|AUDIO|>") < ours.index("What is the man")  # [image, audio, text]
    assert ("Please answer the following question" in ours) is base_model
    assert ("Please think about this question" in ours) is (not base_model)

    # The token ids the model gets: the kit's encode path gives what the processor makes of the original's text.
    row = scan_split(synth_dir / "valid").rows[0]
    ex = {"problem": row.problem, "options": list(row.options)}
    text = processor.apply_chat_template(original_conversation(ex, str(row.image_path), str(row.audio_path), base_model),
                                         add_generation_prompt=True, tokenize=False)
    example = load_example(row)
    expected = processor(text=[text], images=[example.image], audio=[example.audio], return_tensors="pt", padding=False)
    enc = encode_row(processor, row, max_audio_seconds=10.0, max_pixels=256 * 28 * 28,
                     question_text=p.prompt_text(row.problem, row.options), system=p.system_message)
    assert enc.input_ids.tolist() == expected["input_ids"][0].tolist()


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

PROMPT_PART = ("system\nYou are a helpful assistant.\nuser\nWhat is it?\nA. a cat\nB. a dog\nC. a cow\nD. a pig\n"
               "Please answer the following question based on the given image and audio.\nassistant\n")


@pytest.mark.parametrize("reply,expected", [
    ("<think>I see a man</think><answer>c</answer>", "C"),  # the tag first: not the word "a"
    ("<answer> b </answer>", "B"),  # lowercase, spaces
    ("<think>I see a man</think><answer>E</answer>", "A"),  # no A-D tag: the first standalone letter ("a")
    ("The answer is d.", "D"),
    ("I cannot tell.", "?"),  # no letter at all
    ("", "?"),
    (PROMPT_PART + "<answer>B</answer>", "B"),  # the whole decoded sequence: the prompt's letters are cut off
    (PROMPT_PART + "I cannot tell.", "?"),
    (PROMPT_PART + "bad", "?"),  # "bad" holds b, a, d but no standalone letter
    ("<answer>C</answer><answer>A</answer>", "C"),
])
def test_extract_choice_is_the_originals(reply, expected):
    assert original_extract_choice(reply) == expected
    assert extract_choice(reply) == expected


def test_the_kits_lenient_rule_is_not_the_originals():
    reply = "<think>I see a man</think><answer>c</answer>"
    assert parse_answer(reply, ("A", "B", "C", "D"), lenient=True) == "A"  # why echoink-* use extract_choice
    assert extract_choice(reply) == "C"


def test_gold_is_read_as_the_original_reads_it():
    for solution in ("<answer>C</answer>", "<answer> c </answer>", "C", "<answer>E</answer>"):
        match = ORIGINAL_GT_RE.search(solution)
        assert original_gold(solution) == (match.group(1) if match else None)
    assert original_gold("<answer> c </answer>") == "c"  # not upper-cased: no prediction equals it


# ---------------------------------------------------------------------------------------------
# Settings and decoding
# ---------------------------------------------------------------------------------------------


def test_protocols_fix_their_decoding_and_parsing(tmp_path):
    with pytest.raises(EvalError, match="drop --sample"):
        EvalConfig(protocol="echoink-base", do_sample=True)
    with pytest.raises(EvalError, match="drop --lenient"):
        EvalConfig(protocol="echoink-rl", lenient=True)
    with pytest.raises(EvalError, match="drop --temperature"):
        EvalConfig(protocol="echoink-rl", temperature=0.7)
    with pytest.raises(EvalError, match="needs sampled decoding"):
        EvalConfig(protocol="echoink-base", samples=2)
    with pytest.raises(EvalError, match="--protocol must be one of kit, echoink-base, echoink-rl"):
        EvalConfig(protocol="paper")
    rl = EvalConfig(protocol="echoink-rl", samples=3, merged=str(tmp_path))
    assert rl.sampled and rl.parse_rule == "extract_choice" and rl.decoding().max_new_tokens == 1024
    assert EvalConfig(merged=str(tmp_path)).decoding().max_new_tokens == 768
    assert EvalConfig(protocol="echoink-base", max_new_tokens=64).decoding().max_new_tokens == 64
    assert EvalConfig(protocol="echoink-rl", adapter=str(tmp_path / "a")).predictions_path() == tmp_path / "a" / "predictions-echoink-rl.jsonl"


def test_echoink_rl_takes_top_k_and_repetition_penalty_from_the_checkpoint(tmp_path):
    rl, base = PROTOCOLS["echoink-rl"], PROTOCOLS["echoink-base"]
    kw = dict(do_sample=False, temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=None)
    d = resolve_decoding(rl, weights=str(tmp_path), **kw)
    assert (d.do_sample, d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (True, 1.0, 0.95, 50, 1.0)
    assert "no generation_config.json" in d.source
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 20, "repetition_penalty": 1.05, "top_p": 0.8}))
    d = resolve_decoding(rl, weights=str(tmp_path), **kw)
    assert (d.top_k, d.repetition_penalty, d.top_p) == (20, 1.05, 0.95)  # top_p: the original passes 0.95 itself
    assert str(tmp_path / "generation_config.json") in d.source and "top_k 20" in d.describe()
    # The base evaluation passes repetition_penalty=1.0 and decodes greedily: the file changes nothing.
    d = resolve_decoding(base, weights=str(tmp_path), **kw)
    assert (d.do_sample, d.repetition_penalty) == (False, 1.0)
    for bad in ('{"top_k": "many"}', "[1, 2]", "{not json"):
        (tmp_path / "generation_config.json").write_text(bad)
        with pytest.raises(EvalError, match="generation_config.json") as err:
            resolve_decoding(rl, weights=str(tmp_path), **kw)
        assert "\n" not in str(err.value)


def test_repetition_penalty_is_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 12), generator=g)
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, ids, True)
    p = SamplingParams(max_new_tokens=1, eos_id=0, pad_id=0, do_sample=False, repetition_penalty=1.7)
    ours = logits.clone()
    token, _ = sample_next(ours, p, None, seen)
    ref = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    torch.testing.assert_close(ours, ref)
    assert torch.equal(token, ref.argmax(-1)) and not torch.equal(token, logits.argmax(-1))


def test_greedy_with_a_repetition_penalty_is_token_identical_to_generate(engine_setup):
    from echoink_lite.prompting import collate, completion_mask, to_device

    proc, model, encoded, prompts = engine_setup
    tok = proc.tokenizer
    eos = tok.convert_tokens_to_ids("<|VIDEO|>")  # never emitted: full-length rows, more repeats to penalise
    max_new = 10

    def hf(penalty):
        batch = to_device(collate(encoded, 1, tok.pad_token_id), "cpu", torch.float32)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id, repetition_penalty=penalty,
                                 temperature=None, top_p=None, top_k=None)
        comp = out[:, batch["input_ids"].shape[1]:]
        return [c[: int(m.sum())].tolist() for c, m in zip(comp, completion_mask(comp, eos))]

    ref = hf(1.5)
    assert ref != hf(1.0)  # the penalty changes what greedy decoding picks here
    p = SamplingParams(max_new_tokens=max_new, eos_id=eos, pad_id=tok.pad_token_id, do_sample=False, repetition_penalty=1.5)
    res = RolloutEngine(model, p, batch_size=3, cuda_graph=False).generate(prompts, group_size=1)
    assert [c.tolist() for c in res.completions] == ref


# ---------------------------------------------------------------------------------------------
# Scripted completions: what each predictions line records, breakdowns, the content-keyed cache
# ---------------------------------------------------------------------------------------------


class Scripted:
    """Replaces RolloutEngine.generate_rows: the n-th decoded sequence gets script(n)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.sequences = tokenizer, script, 0

    def __get__(self, engine, owner=None):
        return self if engine is None else (lambda prompts, rows, params=None: self(prompts, rows))

    def __call__(self, prompts, rows):
        comps = []
        for _ in rows:
            comps.append(torch.tensor(self.tokenizer.encode(self.script(self.sequences) + "<|im_end|>")))
            self.sequences += 1
        return RolloutResult(comps, [torch.zeros(len(c)) for c in comps], sum(len(c) for c in comps), 0.0, "eager")


def copy_split(synth_dir: Path, tmp_path: Path, edit=None) -> Path:
    split = tmp_path / "valid"
    shutil.copytree(synth_dir / "valid", split)
    if edit:
        list_file = split / "omni_rl_format_valid.json"
        items = json.loads(list_file.read_text())
        edit(items)
        list_file.write_text(json.dumps(items))
    return split


def test_lines_record_prompt_and_reply_and_score_as_the_original(loaded, synth_dir, tmp_path, monkeypatch):
    model, processor = loaded

    def edit(items):  # the original splits at the FIRST "\nassistant", here inside the question: the options follow
        items[1]["problem"] = "Listen first.\nassistant: what colour is the picture and is the sound low or high?"

    split = copy_split(synth_dir, tmp_path, edit)
    rows = scan_split(split).rows[:4]
    replies = ["<think>I see a man</think><answer>c</answer>", "I cannot tell.", "<answer>b</answer>", "maybe D"]
    monkeypatch.setattr(RolloutEngine, "generate_rows", Scripted(processor.tokenizer, lambda n: replies[n]))
    cfg = EvalConfig(data=str(split), protocol="echoink-base", batch_size=4)
    result = evaluate_rows(model, processor, rows, cfg, tmp_path / "p.jsonl", "base", quiet())
    lines = read_lines(tmp_path / "p.jsonl")
    for row, line, reply in zip(rows, lines, replies):
        ex = {"problem": row.problem, "options": list(row.options)}
        conv = original_conversation(ex, str(row.image_path), str(row.audio_path), base_model=True)
        assert line["prompt"] == processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert line["completion"] == reply and line["reply"].endswith("\nassistant\n" + reply)
        assert line["reply"].startswith("system\nYou are a helpful assistant.\nuser\n" + row.problem)
        assert line["parsed"] == original_extract_choice(line["reply"]) and line["protocol"] == "echoink-base"
        assert line["gold"] == row.answer and line["correct"] == (line["parsed"] == row.answer)
    assert [line["parsed"] for line in lines] == ["C", "A", "B", "D"]  # row 1: "A" of "A. red low", as the original
    assert result.accuracy == pytest.approx(sum(line["correct"] for line in lines) / 4)
    assert result.protocol == "echoink-base" and result.parse_rule == "extract_choice"


def test_breakdowns_by_task_type_and_audio_type_match_a_hand_count(loaded, synth_dir, tmp_path, monkeypatch):
    model, processor = loaded

    def edit(items):
        for i, item in enumerate(items):
            item["task_type"] = ["Which", "Where"][i % 2]
        del items[7]["task_type"], items[7]["audio_type"]  # a row without either: "(none)"

    split = copy_split(synth_dir, tmp_path, edit)
    items = json.loads((split / "omni_rl_format_valid.json").read_text())
    answers = {0: "A", 1: "A", 2: "B", 3: "B", 4: "C", 5: "C", 6: "D", 7: "D"}
    monkeypatch.setattr(evaluate, "load_eval_model", lambda cfg: (model, processor))
    monkeypatch.setattr(RolloutEngine, "generate_rows", Scripted(processor.tokenizer, lambda n: f"<answer>{answers[n % 8]}</answer>"))
    console = quiet()
    summary = run_eval(EvalConfig(model="unused", data=str(split), out=str(tmp_path / "p.jsonl"), batch_size=8), console=console)

    def hand(field):
        groups = {}
        for i, item in enumerate(items):
            value = item.get(field) or "(none)"
            right = f"<answer>{answers[i]}</answer>" == item["solution"]
            groups.setdefault(value, []).append(right)
        return {v: {"rows": len(r), "samples": len(r), "accuracy": sum(r) / len(r)} for v, r in sorted(groups.items())}

    result = summary["results"][0]
    assert result["breakdowns"] == {"task_type": hand("task_type"), "audio_type": hand("audio_type")}
    assert set(result["breakdowns"]["audio_type"]) == {"low tone", "high tone", "(none)"}
    assert json.loads((tmp_path / "p.summary.json").read_text())["results"][0]["breakdowns"] == result["breakdowns"]
    text = console.file.getvalue()
    assert "accuracy by task_type" in text and "accuracy by audio_type" in text and "Where" in text

    # Rows without the fields: no breakdown at all.
    bare = copy_split(synth_dir, tmp_path / "bare", lambda items: [(i.pop("task_type"), i.pop("audio_type")) for i in items])
    summary = run_eval(EvalConfig(model="unused", data=str(bare), out=str(tmp_path / "b.jsonl")), console=quiet())
    assert summary["results"][0]["breakdowns"] == {}


def test_an_edited_split_is_regenerated_and_rescored_by_row_content(loaded, synth_dir, tmp_path, monkeypatch):
    import os

    import numpy as np
    import soundfile as sf

    model, processor = loaded
    split = copy_split(synth_dir, tmp_path)
    monkeypatch.setattr(evaluate, "load_eval_model", lambda cfg: (model, processor))
    out = tmp_path / "p.jsonl"
    cfg = EvalConfig(model="unused", data=str(split), out=str(out), limit=5, batch_size=5)
    first = Scripted(processor.tokenizer, lambda n: "<answer>A</answer>")
    monkeypatch.setattr(RolloutEngine, "generate_rows", first)
    run_eval(cfg, console=quiet())
    assert first.sequences == 5

    # Edit in place: row 1's question, row 2's gold answer, row 3's audio (same size and modification time),
    # row 4's options. Row 0 is untouched.
    list_file = split / "omni_rl_format_valid.json"
    items = json.loads(list_file.read_text())
    items[1]["problem"] = "Is the picture red or blue, and the sound low or high?"
    old_gold = items[2]["solution"]
    items[2]["solution"] = "<answer>A</answer>" if old_gold != "<answer>A</answer>" else "<answer>B</answer>"
    items[4]["options"] = ["A. blue high", "B. blue low", "C. red high", "D. red low"]
    list_file.write_text(json.dumps(items))
    wav = split / items[3]["path"]["audio"]
    stat = wav.stat()
    samples, rate = sf.read(wav, dtype="float32")
    sf.write(wav, np.ascontiguousarray(samples[::-1]), rate, subtype="PCM_16")
    os.utime(wav, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert wav.stat().st_size == stat.st_size and wav.stat().st_mtime_ns == stat.st_mtime_ns

    second = Scripted(processor.tokenizer, lambda n: "<answer>A</answer>")
    monkeypatch.setattr(RolloutEngine, "generate_rows", second)
    console = quiet()
    summary = run_eval(cfg, console=console)
    result = summary["results"][0]
    assert second.sequences == 3  # rows 1, 3 and 4; rows 0 and 2 reused
    assert (result["resumed_samples"], result["generated_samples"], result["changed_rows"]) == (2, 3, 3)
    assert result["rescored_samples"] == 1
    gold_now = [it["solution"][len("<answer>"):-len("</answer>")] for it in items[:5]]
    assert result["accuracy"] == pytest.approx(sum(g == "A" for g in gold_now) / 5)  # against the new gold
    last = {}
    for line in read_lines(out):
        last[line["problem_id"]] = line
    assert last[2]["gold"] == gold_now[2] and last[2]["correct"] == (gold_now[2] == "A")
    assert last[2]["rescored_from"] == old_gold[len("<answer>"):-len("</answer>")]
    assert "3 row(s) changed" in console.file.getvalue() and "1 prediction(s) re-scored" in console.file.getvalue()

    # A third run: everything reused, nothing re-scored again.
    third = Scripted(processor.tokenizer, lambda n: "<answer>A</answer>")
    monkeypatch.setattr(RolloutEngine, "generate_rows", third)
    result = run_eval(cfg, console=quiet())["results"][0]
    assert third.sequences == 0 and result["rescored_samples"] == 0 and result["resumed_samples"] == 5


def test_another_protocol_into_the_same_out_is_refused(loaded, synth_dir, tmp_path, monkeypatch):
    model, processor = loaded
    monkeypatch.setattr(evaluate, "load_eval_model", lambda cfg: (model, processor))
    monkeypatch.setattr(RolloutEngine, "generate_rows", Scripted(processor.tokenizer, lambda n: "<answer>A</answer>"))
    out = tmp_path / "p.jsonl"
    run_eval(EvalConfig(model="unused", data=str(synth_dir / "valid"), out=str(out), limit=2), console=quiet())
    with pytest.raises(EvalError, match="other settings"):
        run_eval(EvalConfig(model="unused", data=str(synth_dir / "valid"), out=str(out), limit=2,
                            protocol="echoink-base"), console=quiet())


# ---------------------------------------------------------------------------------------------
# A full Omni checkpoint from the command line, under both protocols
# ---------------------------------------------------------------------------------------------


def test_a_full_omni_checkpoint_under_both_protocols_from_the_cli(tiny_full_model_dir, synth_dir, tmp_path, capsys):
    data = str(synth_dir / "valid")
    common = ["--data", data, "--limit", "4", "--max-new-tokens", "6", "--batch-size", "4", "--max-audio-seconds", "1"]
    assert main(["eval", "--model", str(tiny_full_model_dir), "--protocol", "echoink-base",
                 "--out", str(tmp_path / "base.jsonl"), *common]) == 0
    # The released-model check: a full checkpoint as --merged, with the generation config it ships.
    full = tmp_path / "full"
    shutil.copytree(tiny_full_model_dir, full)
    (full / "generation_config.json").write_text(json.dumps({"top_k": 5, "repetition_penalty": 1.3}))
    assert main(["eval", "--merged", str(full), "--protocol", "echoink-rl", "--samples", "2",
                 "--out", str(tmp_path / "rl.jsonl"), *common]) == 0
    text = capsys.readouterr().out
    assert "protocol echoink-base" in text and "protocol echoink-rl" in text and "accuracy by audio_type" in text

    base = json.loads((tmp_path / "base.summary.json").read_text())
    rl = json.loads((tmp_path / "rl.summary.json").read_text())
    assert base["protocol"]["name"] == "echoink-base" and base["protocol"]["system_message"] == "You are a helpful assistant."
    assert rl["protocol"]["name"] == "echoink-rl" and rl["protocol"]["system_message"] is None
    assert base["protocol"]["decoding"].startswith("greedy")
    assert "top_k 5" in rl["protocol"]["decoding"] and "repetition_penalty 1.3" in rl["protocol"]["decoding"]
    assert str(full / "generation_config.json") in rl["protocol"]["decoding_source"]
    assert rl["protocol"]["differences"] and base["protocol"]["differences"]
    for summary, label, samples in ((base, "base", 1), (rl, "merged", 2)):
        (result,) = summary["results"]
        assert result["label"] == label and result["n_rows"] == 4 and result["n_samples"] == 4 * samples
        assert set(result["breakdowns"]) == {"task_type", "audio_type"}
        assert sum(g["rows"] for g in result["breakdowns"]["audio_type"].values()) == 4
    r = rl["results"][0]
    assert r["accuracy_spread"] is not None and base["results"][0]["sampling_se"] is None  # greedy: no sampling noise
    assert r["sampling_se"] == pytest.approx((r["accuracy"] * (1 - r["accuracy"]) / r["n_rows"]) ** 0.5)
    for name, base_model in (("base", True), ("rl", False)):
        lines = read_lines(tmp_path / f"{name}.jsonl")
        assert all(line["parsed"] == original_extract_choice(line["reply"]) for line in lines)
        assert all(("You are a helpful assistant" in line["prompt"]) for line in lines)  # explicit or default turn
        assert all(("Please think about this question" in line["prompt"]) is (not base_model) for line in lines)


# ---------------------------------------------------------------------------------------------
# eval and infer flags take the recipe's ranges
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,flag", [
    (["--sample", "--temperature", "0"], "--temperature 0.0"),
    (["--sample", "--temperature", "nan"], "--temperature nan"),
    (["--sample", "--top-p", "-1"], "--top-p -1.0"),
    (["--sample", "--top-p", "1.5"], "--top-p 1.5"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--samples", "0"], "--samples 0"),
    (["--limit", "0"], "--limit 0"),
    (["--max-audio-seconds", "0"], "--max-audio-seconds 0.0"),
    (["--max-audio-seconds", "inf"], "--max-audio-seconds inf"),
    (["--max-pixels", "10"], "--max-pixels 10"),
    # the recipe's upper limits too (recipe_bounds.BOUNDS), not only its fields' lower bounds
    (["--max-new-tokens", "40000"], "--max-new-tokens 40000"),
    (["--max-audio-seconds", "100000"], "--max-audio-seconds 100000.0"),
    (["--batch-size", "100000"], "--batch-size 100000"),
    (["--sample", "--samples", "100000"], "--samples 100000"),
    (["--sample", "--seed", str(2**64)], f"--seed {2**64}"),
])
def test_eval_flags_out_of_range_are_one_line(argv, flag, synth_dir, tmp_path, capsys):
    assert main(["eval", "--model", "unused", "--data", str(synth_dir / "valid"), "--out", str(tmp_path / "p.jsonl"),
                 *argv]) == 1
    out = capsys.readouterr()
    (line,) = out.err.splitlines()  # errors go to stderr, nothing to stdout
    assert line.startswith(f"error: {flag}: ") and "Fix: pass" in line and not out.out
    assert not (tmp_path / "p.jsonl").exists()


def test_infer_max_new_tokens_zero_is_one_line(synth_dir, capsys):
    row = scan_split(synth_dir / "valid").rows[0]
    assert main(["infer", "--model", "unused", "--audio", str(row.audio_path), "--image", str(row.image_path),
                 "--question", "?", "--max-new-tokens", "0"]) == 1
    out = capsys.readouterr()
    (line,) = out.err.splitlines()
    assert line.startswith("error: --max-new-tokens 0: ") and "generation.max_completion_tokens" in line
    assert not out.out


def test_three_numbers_side_by_side(loaded, synth_dir, tmp_path, monkeypatch, capsys):
    from echoink_lite import eval_report

    model, processor = loaded
    monkeypatch.setattr(evaluate, "load_eval_model", lambda cfg: (model, processor))
    monkeypatch.setattr(RolloutEngine, "generate_rows", Scripted(processor.tokenizer, lambda n: "<answer>A</answer>"))
    paths = []
    for protocol in ("echoink-base", "echoink-rl", "kit"):
        out = tmp_path / f"{protocol}.jsonl"
        run_eval(EvalConfig(model="unused", protocol=protocol, data=str(synth_dir / "valid"), out=str(out)), console=quiet())
        paths.append(str(evaluate.summary_path(out)))
    capsys.readouterr()
    assert eval_report.main(paths) == 0
    text = capsys.readouterr().out
    accuracy = sum(item["solution"] == "<answer>A</answer>"
                   for item in json.loads((synth_dir / "valid" / "omni_rl_format_valid.json").read_text())) / 8
    assert "evaluations side by side" in text and "80.53%" in text and "85.77%" in text
    assert text.count(f"{100 * accuracy:.2f}%") == 3  # every protocol read "A" from the same replies
    rows = eval_report.side_by_side([json.loads(Path(p).read_text()) for p in paths], quiet())
    assert [(r["protocol"], r["paper"]) for r in rows] == [("echoink-base", 80.53), ("echoink-rl", 85.77), ("kit", None)]
    assert eval_report.main([str(tmp_path / "missing.summary.json")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "missing.summary.json" in line and "pass the .summary.json an eval wrote" in line


def test_the_model_card_names_the_protocol():
    from echoink_lite.export import _eval_lines

    summary = {"split": "valid", "rows_evaluated": 8, "parse_rule": "extract_choice",
               "protocol": {"name": "echoink-rl", "decoding": "sampled: temperature 1, top_p 0.95, top_k 50"},
               "results": [{"label": "adapter", "n_rows": 8, "accuracy": 0.5, "format_failure_rate": 0.0}]}
    text = "\n".join(_eval_lines(summary))
    assert "protocol: `echoink-rl` (sampled: temperature 1, top_p 0.95, top_k 50)" in text
    assert "protocol" not in "\n".join(_eval_lines({**summary, "protocol": None}))


def test_task_type_and_audio_type_are_strings_or_null(synth_dir, tmp_path):
    def edit(items):
        items[0]["task_type"] = 3
        items[1]["audio_type"] = ["music"]
        items[2]["task_type"] = None

    scan = scan_split(copy_split(synth_dir, tmp_path, edit))
    assert [(r.index, r.reason) for r in scan.rejects] == [(0, "malformed_row"), (1, "malformed_row")]
    assert "field 'task_type' is a int, expected a string or null" in scan.rejects[0].detail
    assert "field 'audio_type' is a list" in scan.rejects[1].detail
    row = scan.rows[0]
    assert row.index == 2 and row.task_type is None and row.audio_type in ("low tone", "high tone")
