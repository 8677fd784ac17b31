"""Rollout engine: sample a step's completions fast, with the same distribution as `generate`.

Measured on one H100 (2026-11-26), `generate` on the 4-bit thinker spent 93-123 ms per decode step whatever the
batch (16 to 128 sequences): per-token launch and Python overhead, not the GPU. Its prefill also computed
`lm_head` over every prompt position (about 27 GB of logits for 128 prompts of 700 tokens). This engine:

1. prefills each prompt ONCE (batch 1, towers already run by `encode_prompts`), keeps only the last
   position's logits, and copies the prompt's keys/values into the rows of its group in a preallocated
   (static) KV cache;
2. decodes all rows of a batch together (as many as `batch_size`: 8 prompts x 16 = 128 in one batch when
   memory allows), one token per step, with the whole step - embedding, decoder layers, `lm_head`,
   temperature / top-k / top-p sampling, EOS bookkeeping - on the device and no host sync per token;
3. on CUDA, captures that decode step as a CUDA graph after two eager warm-up steps, checks one replay
   against an eager step, and replays it; if capture fails or the check disagrees, it falls back to eager
   with a one-line notice. `RolloutResult.path` says which path ran ("cuda-graph" or "eager");
4. stops as soon as every row has produced EOS (checked every `sync_every` tokens on a GPU, where the
   check is a host sync; after every token on the CPU).

Sampling is the paper's (EchoInk-R1 trains with temperature 1.0, top_p 0.95 and the generation default
top_k 50): suppressed tokens are set to -inf, then temperature, top-k, top-p, exactly as transformers'
`SuppressTokensLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` do
(tests/test_rollout.py compares the filtered distributions). The draw uses the exponential race
(argmax p_i / E_i with E_i ~ Exp(1), which picks i with probability p_i) because it is graph-safe.
No checkpoint `generation_config` field is read: what is sampled is exactly `SamplingParams`.

Each sampled token's log-prob under temperature-scaled, unfiltered logits is recorded; it is what the loss
pass computes for the same token (tests/test_engine.py checks they agree).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .thinker_forward import CaptureKV, PromptInputs, language_model, rope, run_layers, text_positions, thinker_of


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. `do_sample=False` is greedy (argmax after suppression)."""

    max_new_tokens: int
    eos_id: int
    pad_id: int
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    suppress_ids: tuple[int, ...] = ()
    # 1.0 = off. Otherwise transformers' RepetitionPenaltyLogitsProcessor: every token already in the row (its
    # prompt included) gets logit / penalty if positive, logit * penalty if not, before temperature. Used by the
    # evaluation protocol that takes it from a checkpoint's generation config; training never sets it.
    repetition_penalty: float = 1.0


@dataclass
class RolloutResult:
    completions: list[torch.Tensor]  # per row: token ids up to and including the first EOS (CPU, long)
    logps: list[torch.Tensor]  # per row: log-prob of each of those tokens (temperature-scaled, unfiltered)
    tokens: int  # tokens generated (sum of completion lengths)
    seconds: float
    path: str  # "cuda-graph" or "eager"
    notices: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Sampling (pure tensor code: no host sync, safe inside a CUDA graph)
# ---------------------------------------------------------------------------------------------------
def _candidates(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, vocab ids or None) of the row after temperature, top-k and top-p: -inf for removed tokens.
    `logits` [B, V] fp32, suppressed tokens already -inf. The ids are None when the values are in vocab order.

    The same tensor operations as transformers' TemperatureLogitsWarper, TopKLogitsWarper and
    TopPLogitsWarper (generation/logits_process.py), so the kept set is theirs also under ties, which
    bf16-rounded logits have often: top-k keeps every token tied with the k-th value, and top-p sorts the
    top-k-filtered row ascending with the same (unstable) `torch.sort`, so tokens tied at the top-p cut fall
    on the same side as in transformers. One full-row sort, only when top-p is on (as TopPLogitsWarper)."""
    scaled = logits / p.temperature if p.temperature != 1.0 else logits
    if p.top_k and p.top_k < scaled.shape[-1]:
        kth = scaled.topk(p.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p >= 1.0:
        return scaled, None
    vals, idx = scaled.sort(dim=-1)  # ascending, as TopPLogitsWarper
    remove = vals.softmax(-1).cumsum(-1) <= (1 - p.top_p)
    remove[..., -1] = False  # keep at least one
    return vals.masked_fill(remove, float("-inf")), idx


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """[B, V] the distribution the engine samples from (for tests and diagnostics)."""
    logits = logits.float().clone()
    if p.suppress_ids:
        logits[:, list(p.suppress_ids)] = float("-inf")
    vals, idx = _candidates(logits, p)
    probs = vals.softmax(-1)
    return probs if idx is None else torch.zeros_like(probs).scatter(-1, idx, probs)


def sample_next(logits: torch.Tensor, p: SamplingParams, suppress: torch.Tensor | None,
                seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B], log-prob [B]) from fp32 logits [B, V]. Modifies `logits` in place (repetition penalty,
    suppression). `seen` [B, V] bool: the tokens of each row so far, for `p.repetition_penalty`."""
    logp_all = torch.log_softmax(logits / p.temperature if p.temperature != 1.0 else logits, dim=-1)
    if seen is not None:
        penalized = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    if suppress is not None:
        logits.index_fill_(1, suppress, float("-inf"))
    if p.do_sample:
        vals, idx = _candidates(logits, p)
        probs = vals.softmax(-1)
        # the race runs over the whole row (removed tokens have p = 0); a draw of exactly 0 would make 0/0 = NaN win
        wait = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)
        race = (probs / wait).argmax(-1, keepdim=True)
        token = (race if idx is None else idx.gather(1, race)).squeeze(1)
    else:
        token = logits.argmax(-1)
    return token, logp_all.gather(1, token.unsqueeze(1)).squeeze(1)


# ---------------------------------------------------------------------------------------------------
# Static KV cache and the decode state
# ---------------------------------------------------------------------------------------------------
class StaticKV:
    """Preallocated keys/values [B, kv_heads, T, head_dim] per layer; `update` writes the current token at
    slot `self.slot` (a device tensor, so a captured graph sees each step's value)."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.slot, key_states)
        self.values[layer_idx].index_copy_(2, self.slot, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass
class _Decode:
    cache: StaticKV
    mask: torch.Tensor  # [B, 1, 1, T] bool: prompt slots of the row, and generated slots so far
    tokens: torch.Tensor  # [B] the last sampled token (input of the next step)
    positions: torch.Tensor  # [B] its rope position
    step: torch.Tensor  # [1] index of the token the next step samples
    finished: torch.Tensor  # [B] bool
    out_tokens: torch.Tensor  # [B, max_new]
    out_logps: torch.Tensor  # [B, max_new]
    logits: torch.Tensor  # [B, V] last step's logits (for the graph check)
    seen: torch.Tensor | None = None  # [B, V] bool: tokens of each row so far (only with a repetition penalty)


class RolloutEngine:
    """Samples completions for encoded prompts. One engine per model; `generate` per step.

    `batch_size`: rows decoded together (KV cache = rows x (longest prompt + max_new_tokens) x 56 KiB per
    token on the 7B in bf16). `cuda_graph`: capture the decode step on CUDA (falls back to eager itself)."""

    def __init__(self, model, params: SamplingParams, batch_size: int, cuda_graph: bool = True, sync_every: int = 16):
        self.model = model
        self.params = params
        self.batch_size = max(1, int(batch_size))
        self.cuda_graph = cuda_graph
        self.sync_every = max(1, int(sync_every))
        self.graph_failed: str | None = None  # reason the graph path was abandoned for this engine

    # -- public ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[PromptInputs], group_size: int, params: SamplingParams | None = None) -> RolloutResult:
        """`group_size` completions per prompt, rows laid out prompt by prompt."""
        return self.generate_rows(prompts, [i for i in range(len(prompts)) for _ in range(group_size)], params)

    @torch.no_grad()
    def generate_rows(self, prompts: list[PromptInputs], rows: list[int], params: SamplingParams | None = None) -> RolloutResult:
        """One completion per entry of `rows` (the index of its prompt), decoded `batch_size` rows at a time."""
        p = params or self.params
        was_training = self.model.training
        self.model.eval()
        t0 = time.time()
        completions: list[torch.Tensor] = []
        logps: list[torch.Tensor] = []
        paths, notices = set(), []
        try:
            for s in range(0, len(rows), self.batch_size):
                c, lp, path, note = self._generate_batch(prompts, rows[s: s + self.batch_size], p)
                completions += c
                logps += lp
                paths.add(path)
                if note:
                    notices.append(note)
        finally:
            self.model.train(was_training)
        path = "cuda-graph" if paths == {"cuda-graph"} else ("eager" if paths <= {"eager"} else "mixed")
        return RolloutResult(completions, logps, sum(int(c.numel()) for c in completions), time.time() - t0, path, notices)

    # -- one batch -------------------------------------------------------------------------------------
    def _generate_batch(self, prompts, rows, p: SamplingParams):
        thinker = thinker_of(self.model)
        lm = language_model(self.model)
        cfg = lm.config
        first = prompts[rows[0]].embeds
        device, dtype = first.device, first.dtype
        B, max_new = len(rows), p.max_new_tokens
        width = max(prompts[i].length for i in set(rows))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache = StaticKV(cfg.num_hidden_layers, B, cfg.num_key_value_heads, width + max_new, head_dim, dtype, device)
        mask = torch.zeros(B, 1, 1, width + max_new, dtype=torch.bool, device=device)
        first_logits = torch.empty(B, thinker.lm_head.out_features, dtype=torch.float32, device=device)
        positions = torch.empty(B, dtype=torch.long, device=device)

        # 1. prefill: each prompt once, batch 1, logits at the last position only
        for i in sorted(set(rows)):
            pr = prompts[i]
            idx = torch.tensor([r for r, j in enumerate(rows) if j == i], device=device)
            cap = CaptureKV()
            h = run_layers(lm, pr.embeds[None], rope(lm, pr.embeds[None], pr.positions[:, None, :]), None, cap)
            first_logits[idx] = thinker.lm_head(h[:, -1]).float()
            for layer in range(cfg.num_hidden_layers):
                cache.keys[layer][idx, :, : pr.length] = cap.keys[layer]
                cache.values[layer][idx, :, : pr.length] = cap.values[layer]
            mask[idx, :, :, : pr.length] = True
            positions[idx] = pr.next_position
            del cap, h

        suppress = torch.tensor(p.suppress_ids, dtype=torch.long, device=device) if p.suppress_ids else None
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(B, first_logits.shape[1], dtype=torch.bool, device=device)
            for r, i in enumerate(rows):
                if prompts[i].input_ids is None:
                    raise ValueError("a repetition penalty needs each prompt's input_ids (PromptInputs.input_ids)")
                seen[r, prompts[i].input_ids.to(device)] = True
        token, logp = sample_next(first_logits, p, suppress, seen)
        if seen is not None:
            seen.scatter_(1, token.unsqueeze(1), True)
        st = _Decode(
            cache=cache, mask=mask, tokens=token, positions=positions,
            step=torch.ones(1, dtype=torch.long, device=device), finished=token == p.eos_id,
            out_tokens=torch.full((B, max_new), p.pad_id, dtype=torch.long, device=device),
            out_logps=torch.zeros(B, max_new, dtype=torch.float32, device=device), logits=first_logits, seen=seen,
        )
        st.out_tokens[:, 0], st.out_logps[:, 0] = token, logp
        cache.slot.fill_(width)

        # 2. decode tokens 1 .. max_new-1
        def step():
            self._decode_step(st, lm, thinker.lm_head, p, suppress)

        path, note = "eager", None
        todo = max_new - 1
        if todo > 0 and self.cuda_graph and device.type == "cuda" and self.graph_failed is None and todo > 4:
            path, note = self._run_with_graph(st, step, todo)
        else:
            self._run_eager(st, step, todo)

        # 3. trim each row after its first EOS (EOS kept)
        out_t, out_l = st.out_tokens.cpu(), st.out_logps.cpu()
        is_eos = out_t == p.eos_id
        has = is_eos.any(1)
        lengths = torch.where(has, is_eos.float().argmax(1) + 1, torch.full_like(has, max_new, dtype=torch.long))
        comps = [out_t[r, : int(n)].clone() for r, n in enumerate(lengths)]
        lps = [out_l[r, : int(n)].clone() for r, n in enumerate(lengths)]
        del st, cache
        return comps, lps, path, note

    @staticmethod
    def _decode_step(st: _Decode, lm, lm_head, p: SamplingParams, suppress) -> None:
        st.mask.index_fill_(3, st.cache.slot, True)
        hidden = lm.embed_tokens(st.tokens.unsqueeze(1))  # [B, 1, H]
        pe = rope(lm, hidden, text_positions(st.positions, 1))
        hidden = run_layers(lm, hidden, pe, st.mask, st.cache)
        logits = lm_head(hidden[:, -1]).float()
        st.logits.copy_(logits)
        token, logp = sample_next(logits, p, suppress, st.seen)
        token = torch.where(st.finished, p.pad_id, token)
        if st.seen is not None:
            st.seen.scatter_(1, token.unsqueeze(1), True)
        st.out_tokens.index_copy_(1, st.step, token.unsqueeze(1))
        st.out_logps.index_copy_(1, st.step, logp.unsqueeze(1))
        st.finished |= token == p.eos_id
        st.tokens.copy_(token)
        st.positions += 1
        st.cache.slot += 1
        st.step += 1

    def _run_eager(self, st: _Decode, step, todo: int) -> None:
        # On a GPU the EOS check is a host sync, so it runs every `sync_every` tokens; on the CPU it is free.
        every = self.sync_every if st.finished.device.type == "cuda" else 1
        for n in range(todo):
            step()
            if (n + 1) % every == 0 and bool(st.finished.all()):
                return

    def _run_with_graph(self, st: _Decode, step, todo: int) -> tuple[str, str | None]:
        warmup = 2
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # real decode steps; they also warm up kernels and the allocator
                step()
        torch.cuda.current_stream().wait_stream(side)
        done = warmup
        state = (st.tokens, st.positions, st.step, st.finished, st.cache.slot) + ((st.seen,) if st.seen is not None else ())
        saved = None
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the step; nothing runs, the state is unchanged
                step()
            # Check one replay against an eager step from the same state before trusting the graph.
            saved = [t.clone() for t in state]
            graph.replay()
            replayed = st.logits.clone()
            for t, v in zip(state, saved):
                t.copy_(v)
            saved = None
            step()  # the eager step is the one kept (same slot, so it overwrites what the replay wrote)
            done += 1
            err = float((replayed - st.logits).norm() / st.logits.norm().clamp_min(1e-12))
            if not err < 1e-3:
                raise RuntimeError(f"graph replay differs from eager (relative error {err:.2e})")
        except Exception as exc:  # noqa: BLE001 - any capture problem means: decode eagerly
            self.graph_failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            torch.cuda.synchronize()
            if saved is not None:  # the replay itself failed: go back to the state before it
                for t, v in zip(state, saved):
                    t.copy_(v)
            self._run_eager(st, step, todo - done)
            return "eager", f"rollout: CUDA graph unavailable ({self.graph_failed}); decoding eagerly"
        for n in range(todo - done):
            graph.replay()
            if (n + 1) % self.sync_every == 0 and bool(st.finished.all()):
                break
        del graph
        return "cuda-graph", None
