"""Tiny models and tokenizers built locally, once per session. No test touches the network."""

import json
import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a CUDA machine transformers (5.25 on) would fetch hub kernels for every model it loads: the suite stays offline.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
from transformers import PreTrainedTokenizerFast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "Question: what is the capital of France? Answer: Paris is the capital.",
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
    "Please help me write an email. Sure, here is a short and polite email.",
] * 20


def build_tokenizer(pad_is_eos: bool = False, adds_bos: bool = True, chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer that puts <s> (BOS) in front of every text, like Llama's (`adds_bos=False`: like
    Qwen's or GPT-2's, which add nothing)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>" if pad_is_eos else "<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        chat_template=chat_template,
    )


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForSequenceClassification(config)


def tiny_bert(tokenizer, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )
    return BertForSequenceClassification(config)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama reward model and its tokenizer, saved to disk and loaded back by path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def preference_rows(n: int = 24) -> list[dict]:
    """Explicit-prompt pairs in two groups of unequal size; chosen is polite, rejected is not."""
    rows = []
    for i in range(n):
        rows.append({
            "prompt": f"Question {i}: please help me write an email?",
            "chosen": " Sure, here is a short and polite email." + " Hello" * (i % 3),
            "rejected": " No." + " world" * (i % 4),
            "source": "big" if i % 4 else "small",
            "margin": float(i % 2),
        })
    return rows


@pytest.fixture
def no_model_load(monkeypatch):
    """Data and config errors must come before the weights are loaded."""
    import hf_balanced_reward.trainer as trainer_module

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(trainer_module, "load_model", refuse)


@pytest.fixture
def pairs() -> Dataset:
    return Dataset.from_list(preference_rows())


@pytest.fixture
def pairs_file(tmp_path) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows()))
    return str(path)


def run_workers_together(runs, **env) -> list[dict]:
    """Start every (command, report_dir) at once, one thread each (most of a run is importing, which overlaps), wait
    for all, and return each run's report_dir/result.json. `env` adds to the environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    for _, report_dir in runs:
        os.makedirs(report_dir, exist_ok=True)
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for command, _ in runs]
    results = []
    for process, (_, report_dir) in zip(processes, runs):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-4000:]
        with open(os.path.join(report_dir, "result.json")) as f:
            results.append(json.load(f))
    return results


def pair_row(chosen_ids, rejected_ids, **columns) -> dict:
    """A prepared pair, as the collator takes it: the K = 2 list (chosen, rejected) ranked (1, 2)."""
    return {"completion_ids": [list(chosen_ids), list(rejected_ids)], "ranks": [1, 2], **columns}
