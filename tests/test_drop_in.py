"""Switching from trl.RewardTrainer by changing one import: every RewardConfig option is honoured or refused by
name, chat-template options and tool-call data render as `apply_chat_template` renders them, trl's old column names
and its Hub tags."""

import dataclasses
import os

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments
from trl import RewardConfig

from conftest import CHAT_TEMPLATE, build_tokenizer, tiny_bert, tiny_llama
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, ConfigError, PairCollator

TRL_FIELDS = [f.name for f in dataclasses.fields(RewardConfig) if f.init]
TRAINING_ARGUMENT_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
TRL_OWN_FIELDS = [name for name in TRL_FIELDS if name not in TRAINING_ARGUMENT_FIELDS]


def trl_config(tmp_path, **kwargs) -> RewardConfig:
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", bf16=False, gradient_checkpointing=False,
                    max_steps=1, per_device_train_batch_size=4, save_strategy="no")
    return RewardConfig(**{**defaults, **kwargs})


def conversations(n: int = 4) -> Dataset:
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"Question {i}: hello?"}],
         "chosen": [{"role": "assistant", "content": "Sure, here is a short and polite email."}],
         "rejected": [{"role": "assistant", "content": "No." + " world" * i}]}
        for i in range(n)
    ])


def model_folder(tmp_path, tokenizer, name="model") -> str:
    path = tmp_path / name
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# --- every RewardConfig field -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRL_FIELDS)
def test_every_reward_config_field_has_a_counterpart(name):
    """Fails for a field a future trl adds until someone maps it here (or decides to refuse it)."""
    assert name in BalancedRewardConfig.__dataclass_fields__, (
        f"trl.RewardConfig has a field '{name}' that BalancedRewardConfig does not: honour it (add the field) or make "
        "a non-default value of it an error, and add its behaviour test to TRL_OWN_BEHAVIOUR below."
    )


def test_converted_config_keeps_every_value(tmp_path):
    trl_args = trl_config(tmp_path, eos_token="</s>", pad_token="<pad>", chat_template_path="t.jinja", max_length=77,
                          pad_to_multiple_of=8, center_rewards_coefficient=0.1, learning_rate=3e-3,
                          activation_offloading=True, disable_dropout=False, dataset_num_proc=2,
                          trust_remote_code=True, model_init_kwargs={"dtype": "float32"}, seed=7)
    ours = BalancedRewardTrainer._as_config(trl_args, "unused")
    assert isinstance(ours, BalancedRewardConfig)
    for name in TRL_FIELDS:
        assert getattr(ours, name) == getattr(trl_args, name), name
    defaults = BalancedRewardTrainer._as_config(trl_config(tmp_path), "unused")
    assert defaults.model_init_kwargs == {}  # None in trl: the same meaning


def test_a_set_option_without_a_counterpart_is_refused_by_name(tmp_path):
    @dataclasses.dataclass
    class FutureRewardConfig(RewardConfig):
        new_option: int = 0

    assert BalancedRewardTrainer._as_config(FutureRewardConfig(**_plain(tmp_path)), "m").max_steps == 1  # default: fine
    with pytest.raises(ConfigError, match=r"FutureRewardConfig option new_option=3 has no counterpart in "
                       r"BalancedRewardConfig.*leave it at its default \(0\)"):
        BalancedRewardTrainer._as_config(FutureRewardConfig(**_plain(tmp_path), new_option=3), "m")


def _plain(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "out"), report_to="none", bf16=False, max_steps=1)


def check_model_init_kwargs(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model_dir, trl_config(tmp_path, model_init_kwargs={"dtype": torch.bfloat16}),
                                    train_dataset=pairs)
    assert trainer.model.dtype == torch.bfloat16  # the default here is fp32


def check_trust_remote_code(tmp_path, model_dir, pairs):
    # Nothing here runs remote code; what matters is that the choice reaches the loaders, which read args.
    trainer = BalancedRewardTrainer(model_dir, trl_config(tmp_path, trust_remote_code=True), train_dataset=pairs)
    assert trainer.args.trust_remote_code is True


def check_disable_dropout(tmp_path, model_dir, pairs):
    tokenizer = build_tokenizer()
    for disable in (True, False):
        model = tiny_bert(tokenizer)  # BERT has dropout 0.1
        trainer = BalancedRewardTrainer(model, trl_config(tmp_path, disable_dropout=disable), train_dataset=pairs,
                                        processing_class=tokenizer)
        rates = {m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)}
        assert rates == ({0.0} if disable else {0.1})


def check_dataset_num_proc(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model_dir, trl_config(tmp_path, dataset_num_proc=2), train_dataset=pairs)
    assert trainer.args.dataset_num_proc == 2 and len(trainer.train_dataset) == len(pairs)


def check_max_length(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model_dir, trl_config(tmp_path, max_length=24), train_dataset=pairs)
    lengths = [max(map(len, e["completion_ids"])) for e in trainer.train_dataset]
    assert max(lengths) == 24 and trainer.data_report["train"]["truncated"] > 0  # prompts cut from the left to fit


def check_pad_to_multiple_of(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model_dir, trl_config(tmp_path, pad_to_multiple_of=8),
                                    train_dataset=pairs)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % 8 == 0


def check_center_rewards_coefficient(tmp_path, model_dir, pairs):
    losses = {}
    for coefficient in (None, 0.5):
        trainer = BalancedRewardTrainer(model_dir, trl_config(tmp_path, center_rewards_coefficient=coefficient),
                                        train_dataset=pairs)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            losses[coefficient], rewards = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    expected = losses[None] + 0.5 * (rewards["rewards"].sum(1) ** 2).mean()  # (r_c + r_r)^2 per pair
    torch.testing.assert_close(losses[0.5], expected)


def check_chat_template_path(tmp_path, model_dir, pairs):
    plain = build_tokenizer(chat_template=None)
    folder = model_folder(tmp_path, plain, "no-template")
    template_file = tmp_path / "template.jinja"
    template_file.write_text(CHAT_TEMPLATE)
    # Without the option, conversations cannot be rendered; with it (a .jinja file), they render with that template.
    with pytest.raises(ValueError, match=r"no chat template"):
        BalancedRewardTrainer(folder, trl_config(tmp_path), train_dataset=conversations())
    trainer = BalancedRewardTrainer(folder, trl_config(tmp_path, chat_template_path=str(template_file)),
                                    train_dataset=conversations())
    reference = build_tokenizer()  # the same tokenizer with CHAT_TEMPLATE
    row = conversations()[0]
    expected = reference.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert trainer.train_dataset[0]["completion_ids"][0] == reference(expected)["input_ids"]
    trainer.train()

    # A tokenizer folder: its template, its added tokens (the model's embeddings grow to hold them) and its eos.
    source = build_tokenizer()
    source.add_tokens(["<|tool|>"])
    source.eos_token = "<|assistant|>"
    source.save_pretrained(tmp_path / "source")
    trainer = BalancedRewardTrainer(folder, trl_config(tmp_path, chat_template_path=str(tmp_path / "source")),
                                    train_dataset=conversations())
    tokenizer = trainer.processing_class
    assert tokenizer.chat_template == CHAT_TEMPLATE and "<|tool|>" in tokenizer.get_vocab()
    assert trainer.model.get_input_embeddings().num_embeddings == len(tokenizer.get_vocab()) == len(plain) + 1
    assert trainer.model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|assistant|>")
    trainer.train()

    with pytest.raises(ConfigError, match=r"chat_template_path='.*missing' is neither a \.jinja / \.j2 file nor a "
                       r"tokenizer with a chat template"):
        BalancedRewardTrainer(folder, trl_config(tmp_path, chat_template_path=str(tmp_path / "missing")),
                              train_dataset=conversations())


def check_eos_token(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model_dir, trl_config(tmp_path, eos_token="<|user|>"), train_dataset=pairs)
    eos_id = trainer.processing_class.convert_tokens_to_ids("<|user|>")
    assert trainer.processing_class.eos_token_id == eos_id and trainer.model.config.eos_token_id == eos_id
    # It is what append_eos_token appends, and the pad token of a tokenizer without one.
    args = BalancedRewardConfig(output_dir=str(tmp_path / "o"), report_to="none", eos_token="<|user|>",
                                append_eos_token=True)
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    trainer = BalancedRewardTrainer(tiny_llama(build_tokenizer()), args, train_dataset=pairs, processing_class=tokenizer)
    assert all(e["completion_ids"][0][-1] == eos_id for e in trainer.train_dataset)
    assert trainer.processing_class.pad_token == "<|user|>" and trainer.model.config.pad_token_id == eos_id
    with pytest.raises(ConfigError, match=r"eos_token='<eot>' is not in the tokenizer's vocabulary"):
        BalancedRewardTrainer(model_dir, trl_config(tmp_path, eos_token="<eot>"), train_dataset=pairs)


def check_pad_token(tmp_path, model_dir, pairs):
    trainer = BalancedRewardTrainer(model_dir, trl_config(tmp_path, pad_token="<|user|>"), train_dataset=pairs)
    pad_id = trainer.processing_class.convert_tokens_to_ids("<|user|>")
    assert trainer.model.config.pad_token_id == pad_id
    batch = PairCollator(pad_id)([trainer.train_dataset[i] for i in range(4)])
    assert trainer.data_collator.pad_token_id == pad_id and (batch["input_ids"] == pad_id).any()  # padded with it
    with pytest.raises(ConfigError, match=r"pad_token='<nothing>' is not in the tokenizer's vocabulary"):
        BalancedRewardTrainer(model_dir, trl_config(tmp_path, pad_token="<nothing>"), train_dataset=pairs)


def check_activation_offloading(tmp_path, model_dir, pairs):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"activation_offloading=true moves activations .* this run is on the CPU"):
            BalancedRewardTrainer(model_dir, trl_config(tmp_path, activation_offloading=True), train_dataset=pairs)
        return
    losses = []
    for offload in (False, True):
        trainer = BalancedRewardTrainer(model_dir, trl_config(tmp_path, activation_offloading=offload, max_steps=2,
                                                              logging_steps=1), train_dataset=pairs)
        trainer.train()
        losses.append([log["loss"] for log in trainer.state.log_history if "loss" in log])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


TRL_OWN_BEHAVIOUR = {
    "model_init_kwargs": check_model_init_kwargs,
    "trust_remote_code": check_trust_remote_code,
    "chat_template_path": check_chat_template_path,
    "disable_dropout": check_disable_dropout,
    "dataset_num_proc": check_dataset_num_proc,
    "eos_token": check_eos_token,
    "max_length": check_max_length,
    "pad_to_multiple_of": check_pad_to_multiple_of,
    "center_rewards_coefficient": check_center_rewards_coefficient,
    "activation_offloading": check_activation_offloading,
    "pad_token": check_pad_token,
}


@pytest.mark.parametrize("name", TRL_OWN_FIELDS)
def test_each_option_of_reward_config_is_honoured(name, tmp_path, model_dir, pairs):
    """One behaviour test per option RewardConfig adds to TrainingArguments; a new one fails until it has its own."""
    assert name in TRL_OWN_BEHAVIOUR, f"no drop-in test for trl.RewardConfig.{name}: add one to TRL_OWN_BEHAVIOUR"
    TRL_OWN_BEHAVIOUR[name](tmp_path, model_dir, pairs)


# --- chat_template_kwargs, tools and tool calls -------------------------------------------------------------------

# A template that renders tools, tool calls, tool results and one per-row argument, and shows a message key that is
# present but null (what Arrow adds to messages that never had it) as BROKEN.
TOOL_TEMPLATE = (
    "{% if reasoning %}<think on>{% endif %}"
    "{% if tools %}<|system|>tools: {{ tools | tojson }}</s>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if 'tool_calls' in m %}{% for c in m['tool_calls'] %}call {{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
    "{% if 'content' in m and m['content'] is none %}BROKEN{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Search the web",
                                          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_rows() -> list[dict]:
    """Preference pairs with tool use: a chosen tool call without content, a tool result in the prompt, per-row
    template arguments (one row without), rows with different tools."""
    return [
        {"prompt": [{"role": "user", "content": "Weather in Paris?"}],
         "chosen": [{"role": "assistant", "tool_calls": [call("get_weather", city="Paris")]}],
         "rejected": [{"role": "assistant", "content": "I cannot know that."}],
         "tools": [WEATHER], "chat_template_kwargs": {"reasoning": True}},
        {"prompt": [{"role": "user", "content": "Who won?"},
                    {"role": "assistant", "tool_calls": [call("search", query="final score")]},
                    {"role": "tool", "content": "3-1"}],
         "chosen": [{"role": "assistant", "content": "The home team, 3-1."}],
         "rejected": [{"role": "assistant", "content": "Nobody."}],
         "tools": [SEARCH], "chat_template_kwargs": {}},
        {"prompt": [{"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello there."}],
         "rejected": [{"role": "assistant", "tool_calls": [call("search", query="hi")]}],
         "tools": [WEATHER, SEARCH], "chat_template_kwargs": {"reasoning": False}},
    ]


def tool_tokenizer():
    return build_tokenizer(chat_template=TOOL_TEMPLATE)


@pytest.mark.parametrize("tools_as", ["list", "json"])
def test_tools_tool_calls_and_template_kwargs_render_as_apply_chat_template(tmp_path, tools_as):
    import json

    tokenizer = tool_tokenizer()
    rows = tool_rows()
    stored = [{**r, "tools": json.dumps(r["tools"])} if tools_as == "json" else r for r in rows]
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, save_strategy="no",
                                per_device_train_batch_size=3, on_bad_rows="error")
    model = tiny_llama(tokenizer)
    model.config.max_position_embeddings = 2048  # tool schemas are long in a byte-level vocabulary: nothing is cut
    trainer = BalancedRewardTrainer(model, args, train_dataset=Dataset.from_list(stored), processing_class=tokenizer)
    assert trainer.data_report["train"]["pairs"] == len(rows)
    for row, prepared in zip(rows, trainer.train_dataset):
        prompt = row.get("prompt", [])
        for side, ids in zip(("chosen", "rejected"), prepared["completion_ids"]):
            text = tokenizer.apply_chat_template(prompt + row[side], tools=row["tools"], tokenize=False,
                                                 **row["chat_template_kwargs"])
            assert ids == tokenizer(text)["input_ids"], (row, side)
            assert "BROKEN" not in text and "None" not in tokenizer.decode(ids)
    first = tokenizer.decode(trainer.train_dataset[0]["completion_ids"][0])
    assert first.startswith("<s><think on>") and 'call get_weather{"city": "Paris"}' in first
    assert '"name": "get_weather"' in first and "search" not in first  # row 1's tools only
    assert "<think on>" not in tokenizer.decode(trainer.train_dataset[1]["completion_ids"][0])  # no argument: not rendered
    trainer.train()


@pytest.mark.parametrize("change,problem", [
    ({"tools": "[{"}, r"column 'tools' is not valid JSON"),
    ({"chat_template_kwargs": "reasoning"}, r"column 'chat_template_kwargs' is str, not a mapping"),
    ({"chosen": [{"role": "user", "tool_calls": [call("search", query="x")]}]},
     r"column 'chosen' message 0 has no text 'content' \(only an assistant message may carry 'tool_calls' instead\)"),
    ({"chosen": [{"role": "assistant", "tool_calls": [call("search", query="x")], "content": ["x"]}]},
     r"column 'chosen' message 0 has 'tool_calls' and a 'content' that is not text"),
])
def test_bad_tool_rows_are_named(tmp_path, change, problem):
    from hf_balanced_reward import DataError, prepare_dataset

    row = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}],
           "rejected": [{"role": "assistant", "content": "Go away."}], **change}
    args = BalancedRewardConfig(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(DataError, match=r"row 0: " + problem):
        prepare_dataset(Dataset.from_list([row]), tool_tokenizer(), args)


# --- old column names, Hub tags -----------------------------------------------------------------------------------


def test_old_tokenized_column_names_are_accepted_with_a_warning(tmp_path, model_dir, tokenizer):
    ids = [(tokenizer("Hello world")["input_ids"], tokenizer("No")["input_ids"]),
           (tokenizer("Sure, here")["input_ids"], tokenizer("quick brown fox")["input_ids"])]
    old = Dataset.from_list([{"chosen_input_ids": c, "rejected_input_ids": r} for c, r in ids])
    new = Dataset.from_list([{"chosen_ids": c, "rejected_ids": r} for c, r in ids])
    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, save_strategy="no")
    with pytest.warns(FutureWarning, match=r"train dataset: the columns 'chosen_input_ids' / 'rejected_input_ids' "
                      r"are deprecated"):
        trainer = BalancedRewardTrainer(model_dir, args, train_dataset=old, eval_dataset={"held_out": old})
    reference = BalancedRewardTrainer(model_dir, BalancedRewardConfig(output_dir=str(tmp_path / "ref"), report_to="none"),
                                      train_dataset=new)
    assert trainer.train_dataset[:] == reference.train_dataset[:]
    assert trainer.eval_dataset["held_out"]["completion_ids"] == [list(pair) for pair in ids]
    trainer.train()


def test_model_and_card_carry_trl_reward_model_tags(tmp_path, model_dir, pairs):
    from huggingface_hub import ModelCard

    args = BalancedRewardConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, save_strategy="no")
    trainer = BalancedRewardTrainer(model_dir, args, train_dataset=pairs)
    assert {"trl", "reward-trainer"} <= set(trainer.model.model_tags)
    trainer.model.add_model_tags(["my-tag"])
    trainer.train()
    trainer.save_model()
    tags = ModelCard.load(os.path.join(args.output_dir, "README.md")).data.tags
    assert {"trl", "reward-trainer", "hf_balanced_reward", "my-tag", "reward-model"} <= set(tags)
    assert len(tags) == len(set(tags))


def test_lora_trains_the_embeddings_of_tokens_a_copied_template_added(tmp_path):
    from peft import LoraConfig

    plain = build_tokenizer(chat_template=None)
    folder = model_folder(tmp_path, plain, "no-template")
    source = build_tokenizer()
    source.add_tokens(["<|tool|>"])
    source.save_pretrained(tmp_path / "source")
    args = trl_config(tmp_path, chat_template_path=str(tmp_path / "source"), max_steps=2, learning_rate=0.05)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    rows = [{**r, "chosen": [{"role": "assistant", "content": "<|tool|> Sure, here."}]} for r in conversations().to_list()]
    trainer = BalancedRewardTrainer(folder, args, train_dataset=Dataset.from_list(rows), peft_config=lora)
    new_id = trainer.processing_class.convert_tokens_to_ids("<|tool|>")
    assert lora.trainable_token_indices == [new_id]
    embeddings = lambda: trainer.model.get_input_embeddings()(torch.tensor([new_id])).detach().clone()  # noqa: E731
    before = embeddings()
    trainer.train()
    assert not torch.equal(before, embeddings())  # the new token's embedding was trained


def test_score_command_renders_each_rows_tools_and_template_arguments(tmp_path):
    import json

    from hf_balanced_reward import score_file

    tokenizer = tool_tokenizer()
    model = tiny_llama(tokenizer)
    model.config.max_position_embeddings = 2048  # tool schemas are long in a byte-level vocabulary: nothing is cut
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": r["prompt"], "response": r["chosen"], "tools": r["tools"],
             "chat_template_kwargs": r["chat_template_kwargs"]} for r in tool_rows()]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    score_file(str(tmp_path / "model"), str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"))
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row, result in zip(rows, scored, strict=True):
        text = tokenizer.apply_chat_template(row["prompt"] + row["response"], tools=row["tools"], tokenize=False,
                                             **row["chat_template_kwargs"])
        assert '"name": "' in text  # the row's tools are in what is scored
        with torch.no_grad():
            expected = model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, 0].item()
        assert result["reward"] == pytest.approx(expected, abs=1e-5)


def test_a_trl_config_says_once_what_is_scored_differently(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="hf_balanced_reward"):
        ours = BalancedRewardTrainer._as_config(trl_config(tmp_path), "unused")
    assert ours.append_eos_token is False
    assert caplog.text.count("trl.RewardTrainer appends the eos token") == 1
    assert "append_eos_token=True) to score the texts trl scores" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_balanced_reward"):
        BalancedRewardTrainer._as_config(BalancedRewardConfig(output_dir=str(tmp_path), report_to="none"), "unused")
    assert "eos token" not in caplog.text
