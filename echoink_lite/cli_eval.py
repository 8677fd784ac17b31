"""The `echoink-lite eval` and `echoink-lite infer` commands: their arguments (the model flags are shared, so
both commands load the same model for the same flags), the EvalConfig built from them, and the one-line
errors for settings, data or model problems. The work is done by ``evaluate.run_eval`` and ``infer.run_infer``.
"""

from __future__ import annotations


def _model_arguments(parser) -> None:
    """Which model eval and infer load: a base, an adapter on it, or a merged checkpoint; its quantization."""
    from .eval_model import QUANTIZATION_CHOICES

    a = parser.add_argument
    a("--model", default=None, help="base checkpoint: Hub id or local folder (full Omni or thinker-only); "
      "default with --adapter: the base its adapter_config.json names")
    a("--adapter", default=None, help="LoRA adapter folder saved by a training run, applied on --model")
    a("--merged", default=None, help="merged checkpoint folder, loaded instead of --model (not with --adapter); "
      "--model then only supplies the processor when the folder has none")
    a("--quantization", choices=QUANTIZATION_CHOICES, default="auto",
      help="of the base: auto = as the adapter was trained (its run's recipe.yaml; NF4 for QLoRA), else none; "
      "nf4 = 4-bit NF4; none = unquantized (--dtype)")
    a("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="default: bfloat16 on CUDA, float32 on CPU")


def add_eval_arguments(parser) -> None:
    from .eval_protocols import PROTOCOL_CHOICES

    _model_arguments(parser)
    a = parser.add_argument
    a("--data", default="data/avqa/valid", help="split folder (AVQA layout) or its JSON list")
    a("--out", default=None, help="predictions JSONL (default: ADAPTER_OR_MERGED_DIR/predictions[-PROTOCOL].jsonl, else "
      "./eval/); reruns resume it")
    a("--protocol", choices=PROTOCOL_CHOICES, default="kit",
      help="kit (default): the training prompt, greedy unless --sample, strict parsing; echoink-base / echoink-rl: "
      "the original's evaluation of the base (80.53%%) / trained (85.77%%) model: its prompt, system message, "
      "decoding and extract_choice parser (docs/reproduction.md)")
    a("--batch-size", type=int, default=8, help="rows decoded together (each repeated --samples times)")
    a("--max-new-tokens", type=int, default=None,
      help="completion budget (default: 768 for kit, the paper's training budget; 1024 for echoink-*, the original's)")
    a("--sample", action="store_true", help="kit protocol: sample like the paper's training (temperature 1, top_p 0.95) "
      "instead of greedy (echoink-rl always samples)")
    a("--temperature", type=float, default=None, help="sampling temperature (kit protocol with --sample; default 1.0)")
    a("--top-p", type=float, default=None, help="nucleus sampling (kit protocol with --sample; default 0.95)")
    a("--samples", type=int, default=1, metavar="K", help="completions per row (sampled decoding); reports mean ± spread")
    a("--seed", type=int, default=0, help="sampling seed")
    a("--lenient", action="store_true", help="kit protocol: fall back to the first standalone option letter if no "
      "<answer> tag (counts the word 'a' as A)")
    a("--limit", type=int, default=None, help="only the first N usable rows")
    a("--compare-base", action="store_true", help="also score the base model (adapter switched off) and print the difference")
    a("--max-audio-seconds", type=float, default=10.0, help="audio cut (the paper: 10 s)")
    a("--max-pixels", type=int, default=256 * 28 * 28, help="image pixel cap (the paper: 256*28*28)")
    a("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA (the CUDA-graph decode falls back by itself)")


def eval_config_from_args(args):
    from .evaluate import PAPER_TEMPERATURE, PAPER_TOP_P, EvalConfig, EvalError

    if args.protocol == "kit" and not args.sample and (args.temperature is not None or args.top_p is not None):
        raise EvalError("--temperature and --top-p apply to sampling; add --sample (without it decoding is greedy)")
    return EvalConfig(
        model=args.model, adapter=args.adapter, merged=args.merged, data=args.data, out=args.out,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, protocol=args.protocol,
        do_sample=args.sample and args.protocol != "echoink-rl",
        temperature=PAPER_TEMPERATURE if args.temperature is None else args.temperature,
        top_p=PAPER_TOP_P if args.top_p is None else args.top_p,
        samples=args.samples, seed=args.seed, lenient=args.lenient, limit=args.limit,
        compare_base=args.compare_base, quantization=args.quantization, dtype=args.dtype,
        max_audio_seconds=args.max_audio_seconds, max_pixels=args.max_pixels, cuda_graph=not args.no_cuda_graph,
    )


def cmd_eval(args, console=None) -> int:
    """`echoink-lite eval ...`: 0 on success; 1 with a one-line error for settings, data or model problems."""
    from rich.console import Console
    from rich.markup import escape

    from .data import DataError
    from .evaluate import EvalError, run_eval
    from .modeling import ModelLoadError

    errors = console or Console(stderr=True)  # an error goes to stderr, the results to stdout
    console = console or Console()
    try:
        run_eval(eval_config_from_args(args), console=console)
    except (EvalError, DataError, ModelLoadError) as err:
        errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)  # one line, any width
        return 1
    return 0


def add_infer_arguments(parser) -> None:
    _model_arguments(parser)
    a = parser.add_argument
    a("--audio", required=True, help="audio file (first 10 s used, 16 kHz mono)")
    a("--image", required=True, help="image file")
    a("--question", required=True, help="the question")
    a("--options", nargs="+", default=None, help='answer options, e.g. "A. cat" "B. dog" (letters added if missing); '
      "with options the paper's reasoning prompt is used")
    a("--max-new-tokens", type=int, default=768, help="completion budget")
    a("--sample", action="store_true", help="sample (temperature 1, top_p 0.95) instead of greedy")
    a("--no-stream", action="store_true", help="print only the final panel, not the tokens as they come")


def cmd_infer(args, console=None) -> int:
    """`echoink-lite infer ...`: stream the completion, then a panel with reasoning and answer."""
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel

    from .data import DataError
    from .evaluate import EvalError
    from .infer import option_warnings, run_infer
    from .modeling import ModelLoadError

    errors = console or Console(stderr=True)  # warnings and errors go to stderr, the answer to stdout
    console = console or Console()
    for warning in option_warnings(args.options):
        errors.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    try:
        result = run_infer(args.audio, args.image, args.question, model=args.model, adapter=args.adapter,
                           merged=args.merged, options=args.options, max_new_tokens=args.max_new_tokens,
                           do_sample=args.sample, stream=not args.no_stream, quantization=args.quantization,
                           dtype=args.dtype, console=console)
    except (EvalError, DataError, ModelLoadError) as err:
        errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)  # one line, any width
        return 1
    think = result["think"] if result["think"] is not None else "(no <think> block)"
    answer = result["answer"] if result["answer"] is not None else "(no valid answer)"
    body = f"[bold]reasoning[/]\n{escape(think)}\n\n[bold]answer[/] {escape(answer)}"
    footer = f"{result['prompt_tokens']} prompt tokens, {result['new_tokens']} new tokens"
    console.print(Panel(body, title="echoink-lite infer", subtitle=footer))
    return 0
