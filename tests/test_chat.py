"""Chat and generate, driven by scripted turns: history, commands, --compare, Ctrl-C, JSONL output."""

from __future__ import annotations

import io
import json

import pytest
from test_export import train_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    return train_run(tmp_path_factory, tiny_model_dir, tiny_data_dir, "chat_lora")


@pytest.fixture(scope="module")
def loaded(run):
    from poet_mlx.generate.chat import load_for_chat

    return load_for_chat(None, str(run))  # the model comes from the run's config


GREEDY = dict(temperature=0.0, max_tokens=12)


@pytest.fixture
def prompts_seen(monkeypatch):
    """Record the token ids every reply was generated from (generation itself is unchanged)."""
    import poet_mlx.generate.chat as chat

    seen, real = [], chat.generate_stream

    def spy(model, tokenizer, ids, sampling, reply, prompt_cache=None):
        seen.append((reply.variant, list(reply.prompt_ids)))  # the whole prompt, cached part included
        return real(model, tokenizer, ids, sampling, reply, prompt_cache)

    monkeypatch.setattr(chat, "generate_stream", spy)
    return seen


def consume(streams) -> list[str]:
    return ["".join(s) for s in streams]


def session(loaded, **kw):
    from poet_mlx.generate.chat import ChatSession, Sampling

    sampling = Sampling(**{**GREEDY, **kw.pop("sampling", {})})
    return ChatSession(loaded.model, loaded.tokenizer, has_adapters=True, sampling=sampling, **kw)


def test_turns_reuse_the_kv_cache_and_reply_as_without_it(loaded):
    """Turn 2 computes only its new tokens; the replies equal those of sessions that recompute everything."""
    from poet_mlx.generate import chat

    turns = ["Tell me about the river.", "And the moon?", "Describe the city."]
    cached = session(loaded)
    replies = []
    for t in turns:
        (stream,) = cached.ask(t)
        replies.append("".join(stream))
        reply = stream.reply
        assert reply.cached_tokens + reply.prompt_tokens == len(reply.prompt_ids)
    assert reply.cached_tokens > 0 and reply.prompt_tokens < len(reply.prompt_ids) / 2
    fresh = []
    for i, t in enumerate(turns):
        s = session(loaded)
        s.histories["aligned"] = [dict(m) for m in cached.histories["aligned"][: 2 * i]]
        s.caches["aligned"] = chat.TurnCache()
        (stream,) = s.ask(t)
        fresh.append("".join(stream))
        assert stream.reply.cached_tokens == 0
    assert replies == fresh
    cached.command("/reset")
    (stream,) = cached.ask("Hello")
    "".join(stream)
    assert stream.reply.cached_tokens == 0


def test_history_is_kept_and_reset_clears_it(loaded, prompts_seen):
    tok = loaded.tokenizer
    s = session(loaded)
    (first,) = consume(s.ask("Tell me about the river."))
    consume(s.ask("And the moon?"))
    assert [m["role"] for m in s.messages("aligned")] == ["user", "assistant", "user", "assistant"]
    assert s.messages("aligned")[1]["content"] == first
    second_prompt = tok.decode(prompts_seen[1][1])
    assert "Tell me about the river." in second_prompt and first in second_prompt and "And the moon?" in second_prompt

    assert "cleared" in s.command("/reset").text
    assert s.messages("aligned") == []
    consume(s.ask("Tell me about the river."))
    assert prompts_seen[2][1] == prompts_seen[0][1]  # after /reset the model sees a fresh conversation


def test_system_prompt_and_save(loaded, prompts_seen, tmp_path):
    s = session(loaded)
    assert s.command("/system") .text == "no system prompt"
    s.command("/system You are terse.")
    consume(s.ask("Describe the city."))
    assert "<|system|>\nYou are terse.<|end|>" in loaded.tokenizer.decode(prompts_seen[0][1])
    assert s.command("/save").error
    result = s.command(f"/save {tmp_path / 'chat.json'}")
    assert not result.error
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["system"] == "You are terse." and saved["sampling"]["temperature"] == 0.0
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]
    assert saved["messages"][2]["tokens"] > 0 and saved["messages"][2]["finish_reason"] in ("stop", "length")
    assert s.command("/nope").error and s.command("/exit").exit
    assert s.command("hello") is None


def test_compare_answers_with_base_and_aligned(loaded):
    """Greedy replies must equal mlx-lm's own generation without and with the adapters."""
    from mlx_lm import generate

    from poet_mlx.adapters import adapters_disabled
    from poet_mlx.generate.chat import encode_messages

    s = session(loaded, compare=True)
    streams = s.ask("Tell me about the ocean.")
    assert [x.reply.variant for x in streams] == ["base", "aligned"]
    base, aligned = consume(streams)
    ids = encode_messages(loaded.tokenizer, [{"role": "user", "content": "Tell me about the ocean."}])
    with adapters_disabled(loaded.model):
        assert base == generate(loaded.model, loaded.tokenizer, ids, max_tokens=12)
    assert aligned == generate(loaded.model, loaded.tokenizer, ids, max_tokens=12)
    assert base != aligned  # the adapters were trained with a large step: the two models differ
    saved = s.transcript()
    assert saved["messages"][-1]["content"] == aligned and saved["base_messages"][-1]["content"] == base


def test_stopping_a_reply_keeps_what_was_said(loaded):
    s = session(loaded, compare=True, sampling={"max_tokens": 40})
    base, aligned = s.ask("Describe the forest.")
    pieces = iter(base)
    got = next(pieces) + next(pieces)
    base.close()  # what the CLI does on Ctrl-C
    aligned.close()  # never started: no turn is recorded for it
    assert s.messages("base")[-1]["content"] == got
    assert s.messages("base")[-1]["finish_reason"] == "interrupted"
    assert s.messages("aligned") == []
    consume(s.ask("Describe the city."))  # the session goes on
    assert len(s.messages("base")) == 4 and len(s.messages("aligned")) == 2


def test_compare_needs_adapters(loaded):
    from poet_mlx.errors import PoetError
    from poet_mlx.generate.chat import ChatSession

    with pytest.raises(PoetError, match="--adapter-path"):
        ChatSession(loaded.model, loaded.tokenizer, has_adapters=False, compare=True)


def scripted(lines):
    it = iter(lines)

    def read_line():
        item = next(it, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    return read_line


def test_cli_chat_scripted_session(run, tmp_path):
    from rich.console import Console

    from poet_mlx.cli.chat import main

    class CtrlCOnce(Console):
        """Raises KeyboardInterrupt on the first streamed piece, like a user pressing Ctrl-C mid-reply."""

        fired = False

        def out(self, *a, **k):
            if not CtrlCOnce.fired:
                CtrlCOnce.fired = True
                raise KeyboardInterrupt
            return super().out(*a, **k)

    buf = io.StringIO()
    lines = ["Tell me about the moon.", KeyboardInterrupt, "/system Be kind.", "Describe the garden.", "/help",
             f"/save {tmp_path / 't.json'}", "/exit", "never read"]
    code = main(["--adapter-path", str(run), "--compare", "--temperature", "0", "--max-tokens", "8"],
                read_line=scripted(lines), console=CtrlCOnce(file=buf, width=100))
    text = buf.getvalue()
    assert code == 0
    assert "poet-mlx chat" in text and "compare" in text
    assert "stopped" in text and "Ctrl-D or /exit leaves" in text and "/save FILE" in text
    assert "tokens/s" in text and "base ›" in text and "aligned ›" in text
    saved = json.loads((tmp_path / "t.json").read_text())
    # turn 1 was stopped during the base reply (nothing shown yet), turn 2 completed for both models
    assert [m["role"] for m in saved["base_messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert saved["base_messages"][2]["finish_reason"] == "interrupted"
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]


def test_cli_chat_errors(run, capsys):
    from poet_mlx.cli.chat import main

    assert main(["--compare", "--model", "x"], read_line=scripted([])) == 2
    assert "--adapter-path" in capsys.readouterr().err
    assert main(["--adapter-path", str(run), "--top-p", "0"], read_line=scripted([])) == 2
    assert "--top-p" in capsys.readouterr().err


def test_generate_jsonl(run, tmp_path, capsys):
    from poet_mlx.cli.main import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Tell me about the river."}\n\n{"prompt": "Describe the moon."}\n')
    out = tmp_path / "out.jsonl"
    args = ["generate", "--adapter-path", str(run), "--max-tokens", "6"]
    assert main(args + ["--prompts", str(prompts), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Tell me about the river.", "Describe the moon."]
    for r in rows:
        assert set(r) >= {"prompt", "reply", "tokens", "tokens_per_second"}
        assert 0 < r["tokens"] <= 6 and r["tokens_per_second"] > 0
    capsys.readouterr()
    assert main(args + ["--prompt", "Tell me about the river."]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line) == {**rows[0], "tokens_per_second": json.loads(line)["tokens_per_second"]}

    text = tmp_path / "p.txt"
    text.write_text("Describe the moon.\n\n")
    assert main(args + ["--prompts", str(text)]) == 0
    assert json.loads(capsys.readouterr().out)["reply"] == rows[1]["reply"]
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    assert main(args + ["--prompts", str(prompts)]) == 2
    assert "p.jsonl:2" in capsys.readouterr().err
