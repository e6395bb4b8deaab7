"""Preference rows -> token ids: chat template, TRL's prompt/response boundary, EOS, and the length cuts.

Convention (TRL >= 0.29, POET.md):
- Conversational rows always go through the tokenizer's chat template: the prompt messages rendered with
  the generation prompt, and the full conversation (prompt + assistant turn). String rows go through it too
  when the tokenizer has one and `chat_template` is on, as one user turn (plus the system prompt).
- With `chat_template` off (or no template), string rows are used raw: prompt_ids = tokenizer(prompt) (a
  BOS only if the tokenizer adds one), full = tokenizer(prompt + response + eos_text) unless the response
  already ends with the EOS text.
- Whose are the assistant header tokens (`<|im_start|>assistant\n`, `<|start_header_id|>assistant...`):
  `assistant_header="prompt"` (TRL's convention, the default) renders the prompt with the generation prompt,
  so the header belongs to the prompt. `"response"` follows the official POET/SimPO code, which renders the
  prompt without the generation prompt and the assistant message on its own: the header tokens are then
  response tokens, scored by every loss and counted in POET's k, SimPO's average and `--poet-ratio`. poet-mlx
  takes the response as the rest of the rendered conversation, which equals the official rendering where a
  message renders the same alone as in context (Llama 3, Mistral, Gemma 2 templates); the official code would
  also put the default system block of a template like Qwen 2.5's into the response, and inserts an empty
  system message where a template mentions one: neither is copied.
- The response is the full ids minus their common prefix with the prompt ids, so a token merged across the
  boundary belongs to the response. Chosen and rejected share the prompt: the prompt boundary is the shorter of
  their two common prefixes. A response with no EOS token gets the tokenizer's EOS appended.
- Length cuts (TRL's semantics): a prompt longer than `max_prompt_length` keeps its last tokens; then each
  response is cut at its end so that prompt + response <= `max_length` (a cut response loses its EOS).
  A pair whose responses are identical after the cuts carries no preference and is dropped (counted).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import PoetError


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids (int32 arrays); responses exclude the prompt."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    index: int
    where: str = ""


@dataclass
class TokenizeReport:
    pairs_in: int = 0
    pairs_out: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    eos_appended: int = 0
    dropped: Counter = field(default_factory=Counter)
    """Reason -> number of pairs dropped."""

    def summary(self) -> str:
        parts = [f"{self.pairs_out}/{self.pairs_in} pairs kept"]
        if self.prompts_cut:
            parts.append(f"{self.prompts_cut} prompts cut to max_prompt_length")
        if self.responses_cut:
            parts.append(f"{self.responses_cut} pairs with a response cut to max_length")
        parts += [f"{n} dropped: {why}" for why, n in self.dropped.items()]
        return "; ".join(parts)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def uses_chat_template(tokenizer, chat_template: bool) -> bool:
    return bool(chat_template and getattr(tokenizer, "has_chat_template", False))


def _messages(row) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) as message lists for the chat template."""
    if row.conversational:
        return list(row.prompt), list(row.chosen), list(row.rejected)
    prompt = ([{"role": "system", "content": row.system}] if row.system else []) + [
        {"role": "user", "content": row.prompt}
    ]
    return prompt, [{"role": "assistant", "content": row.chosen}], [{"role": "assistant", "content": row.rejected}]


def _texts(row, tokenizer, templated: bool, assistant_header: str = "prompt",
           template_kwargs: Optional[dict] = None) -> tuple[str, str, str, bool]:
    """(prompt_text, chosen_full_text, rejected_full_text, add_special_tokens)."""
    if templated:
        prompt, chosen, rejected = _messages(row)
        kw = template_kwargs or {}

        def render(messages, **extra):
            return tokenizer.apply_chat_template(messages, tokenize=False, **extra, **kw)

        return (
            render(prompt, add_generation_prompt=assistant_header == "prompt"),
            render(prompt + chosen),
            render(prompt + rejected),
            False,  # the template writes its own BOS
        )
    if row.conversational:
        raise PoetError(
            f"{row.where}: conversational rows need a chat template, and this tokenizer has none. "
            "Use a model whose tokenizer_config.json has a chat_template, or convert the rows to "
            "prompt/chosen/rejected strings."
        )
    eos = tokenizer.eos_token or ""
    prompt = f"{row.system}\n\n{row.prompt}" if row.system else row.prompt

    def full(response: str) -> str:
        return prompt + response + ("" if eos and response.endswith(eos) else eos)

    return prompt, full(row.chosen), full(row.rejected), True


def _encode_all(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return hf(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _cut(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int,
         report: TokenizeReport) -> Optional[tuple]:
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        report.prompts_cut += 1
    room = max_length - len(prompt)
    if room < 1:
        report.dropped["prompt leaves no room for a response (raise max_length)"] += 1
        return None
    if len(chosen) > room or len(rejected) > room:
        report.responses_cut += 1
        chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        report.dropped["chosen and rejected identical after the max_length cut"] += 1
        return None
    return prompt, chosen, rejected


def tokenize_pairs(
    rows: Sequence,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    chat_template: bool = True,
    progress: Callable[[int, int], None] | None = None,
    chunk: int = 512,
    assistant_header: str = "prompt",
    template_kwargs: Optional[dict] = None,
) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenize preference rows (see the module docstring for the convention).

    Args:
        rows: `poet_mlx.data.sources.PreferenceRow`s (standard or conversational).
        tokenizer: an mlx-lm TokenizerWrapper (or a Hugging Face tokenizer).
        assistant_header: "prompt" (TRL) or "response" (the official POET code), under a chat template.
        template_kwargs: extra arguments of the chat template (e.g. {"enable_thinking": False}).
        progress: called as progress(done, total) after each chunk.

    Returns:
        The kept pairs in input order, and a report of what was cut or dropped.
    """
    templated = uses_chat_template(tokenizer, chat_template)
    eos_ids = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    eos_id = tokenizer.eos_token_id
    report = TokenizeReport(pairs_in=len(rows))
    pairs = []
    for start in range(0, len(rows), chunk):
        batch = rows[start : start + chunk]
        texts = [_texts(r, tokenizer, templated, assistant_header, template_kwargs) for r in batch]
        add_special = texts[0][3] if texts else True
        flat = _encode_all(tokenizer, [t for tt in texts for t in tt[:3]], add_special)
        for j, row in enumerate(batch):
            p_ids, c_full, r_full = flat[3 * j : 3 * j + 3]
            boundary = min(common_prefix_len(p_ids, c_full), common_prefix_len(p_ids, r_full))
            chosen, rejected = c_full[boundary:], r_full[boundary:]
            for resp in (chosen, rejected):
                if eos_id is not None and not eos_ids.intersection(resp):
                    resp.append(eos_id)
                    report.eos_appended += 1
            cut = _cut(c_full[:boundary], chosen, rejected, max_length, max_prompt_length, report)
            if cut is not None:
                arrays = [np.asarray(x, dtype=np.int32) for x in cut]
                pairs.append(TokenizedPair(*arrays, index=row.index, where=row.where))
        if progress:
            progress(min(start + chunk, len(rows)), len(rows))
    report.pairs_out = len(pairs)
    return pairs, report


def turn_end_warning(tokenizer, template_kwargs: Optional[dict] = None) -> Optional[str]:
    """A warning when the chat template ends an assistant turn with no token that stops generation.

    Trained replies then end with that turn-end token, but sampling (here and in mlx-lm) stops only at the
    tokenizer's EOS ids, so replies would run on past it. None when there is no template or all is well.
    """
    if not getattr(tokenizer, "has_chat_template", False):
        return None
    kw = template_kwargs or {}
    user = [{"role": "user", "content": "Hi"}]
    try:
        prompt = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, **kw))
        full = list(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "Fine."}], **kw))
    except Exception:  # a template that cannot render this probe: nothing to say
        return None
    reply = full[common_prefix_len(prompt, full):]
    stops = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    if not reply or stops.intersection(reply):
        return None
    content = list(tokenizer.encode("Fine.", add_special_tokens=False))
    tail = reply[len(content):] if reply[:len(content)] == content else reply[-2:]
    return (f"the chat template ends an assistant turn with {tokenizer.decode(tail)!r} (ids {tail}), which is not "
            f"a stop token of generation (eos ids {sorted(stops)}): replies would run on past it. Add its id to "
            "eos_token_id in the model's generation_config.json")


def pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid if pid is not None else tokenizer.eos_token_id or 0)
