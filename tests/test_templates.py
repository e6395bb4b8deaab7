"""Chat templates: options passed as mlx-lm names them (--chat-template-config), a warning when the template's
turn end is not a stop token, and multi-turn conversational prompts (loss on the final assistant turn)."""

from __future__ import annotations

import pytest
from conftest import cli, one_error_line

THINKING = (  # the tiny template, where enable_thinking opens every assistant turn with "think" (as Qwen3's
    # template writes its think block), in the generation prompt and in the conversation alike
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' and enable_thinking %}{{ 'think\\n' }}{% endif %}"
    "{{ message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% if enable_thinking %}{{ 'think\\n' }}{% endif %}"
    "{% endif %}"
)


@pytest.fixture
def tok(tiny_model_dir):
    from poet_mlx.models import load_model

    _, tokenizer, _ = load_model(str(tiny_model_dir))
    return tokenizer


def rows(records):
    from poet_mlx.data.sources import rows_from_records

    return rows_from_records(records, "test")[0]


def test_template_options_reach_the_template(tok, monkeypatch):
    from poet_mlx.data.tokenization import tokenize_pairs
    from poet_mlx.generate.chat import encode_messages

    monkeypatch.setattr(tok._tokenizer, "chat_template", THINKING)
    data = rows([{"prompt": "Tell me about the river.", "chosen": "Sure.", "rejected": "No."}])
    plain, _ = tokenize_pairs(data, tok, 128, 64)
    thinking, _ = tokenize_pairs(data, tok, 128, 64, template_kwargs={"enable_thinking": True})
    assert "think" not in tok.decode(plain[0].prompt) and tok.decode(thinking[0].prompt).endswith("think\n")
    user = [{"role": "user", "content": "Hi"}]
    assert tok.decode(encode_messages(tok, user, {"enable_thinking": True})).endswith("think\n")
    assert not tok.decode(encode_messages(tok, user)).endswith("think\n")


def test_config_takes_the_json_object_and_refuses_anything_else():
    from poet_mlx.config import RunConfig, validate
    from poet_mlx.errors import PoetError

    cfg = RunConfig.from_flat({"model": "m", "data": "d", "chat_template_config": '{"enable_thinking": false}'})
    validate(cfg)
    assert cfg.data.template_kwargs == {"enable_thinking": False}
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(PoetError, match="chat_template_config"):
            validate(RunConfig.from_flat({"model": "m", "data": "d", "chat_template_config": bad}))


def test_generate_refuses_bad_template_config_in_one_line(tiny_model_dir, capsys):
    assert cli("generate", "--model", tiny_model_dir, "--prompt", "Hi", "--chat-template-config", "{oops") == 2
    assert "--chat-template-config" in one_error_line(capsys.readouterr().err)


def test_turn_end_that_does_not_stop_generation_is_warned(tok, monkeypatch):
    from poet_mlx.data.tokenization import turn_end_warning

    assert turn_end_warning(tok) is None  # the tiny template ends turns with <|end|>, its EOS
    monkeypatch.setattr(type(tok), "eos_token_ids", property(lambda self: {tok.convert_tokens_to_ids("<|pad|>")}),
                        raising=False)
    warning = turn_end_warning(tok)
    assert warning and "<|end|>" in warning and "generation_config.json" in warning


def test_multi_turn_prompts_put_earlier_turns_in_the_prompt(tok):
    from poet_mlx.data.tokenization import tokenize_pairs

    history = [{"role": "user", "content": "Tell me about the moon."},
               {"role": "assistant", "content": "Sure, here is a note on the moon."},
               {"role": "user", "content": "And the river?"}]
    data = rows([{"prompt": history, "chosen": [{"role": "assistant", "content": "Happy to help with the river."}],
                  "rejected": [{"role": "assistant", "content": "No. I will not do that."}]}])
    (pair,), _ = tokenize_pairs(data, tok, 256, 128)
    prompt = tok.decode(pair.prompt)
    assert "note on the moon" in prompt and prompt.rstrip().endswith("<|assistant|>")
    assert tok.decode(pair.chosen) == "Happy to help with the river.<|end|>\n"
    assert tok.decode(pair.rejected) == "No. I will not do that.<|end|>\n"
    assert tok.apply_chat_template(history, add_generation_prompt=True) == list(pair.prompt)
