"""The run's datasets as the trainer reads them: each prepared once (`preparation.py`), every group named in order of
first sight (a row's `group_id` indexes `group_names`, on every process alike), a report per dataset, the balanced
loss fitted on the train set and cross-prompt negatives added to it, and the eval sets' texts kept for the exploit
probes (they score edited texts, not the tokenised rows)."""

import json
import logging

from datasets import Dataset, IterableDataset

from .attribute_training import BAD_SCORES, is_single_responses, prepare_responses, with_attribute_scores
from .config import ConfigError, loss_option_defaults
from .cross_prompt import add_off_prompt_responses
from .data import ROW_COLUMN, DataError, column_names, has_pair_texts, is_stream, numbered, pair_texts
from .listwise import is_listwise
from .losses import LOSSES
from .preflight import warn_unused_ties
from .preparation import add_group_ids, check_scored, prepare_dataset, prepare_stream
from .row_checks import check_hinge_margins
from .streaming import count_stream

logger = logging.getLogger(__name__)


class RunData:
    """Prepares the run's datasets with its tokenizer, config and loss (`trains_lists`: rows are prepared as lists
    whatever they hold), keeping `group_names`, `reports` (per dataset: rows, kept, truncated, dropped per reason)
    and `probe_sets` (the numbered texts of the eval sets)."""

    def __init__(self, tokenizer, args, loss_fn, balance, trains_lists: bool, max_length: int | None):
        self.tokenizer, self.args, self.loss_fn, self.balance = tokenizer, args, loss_fn, balance
        self.trains_lists, self.max_length = trains_lists, max_length
        self.group_names: list[str] = []
        self.reports: dict[str, dict] = {}
        self.probe_sets: dict[str, Dataset] = {}

    def prepare_train(self, dataset, user_loss_fn=None):
        """The train set prepared, with what the balanced loss needs first: a streamed set counted in one pass, the
        balancer fitted on the groups and length directions, cross-prompt partners picked."""
        args, balance = self.args, self.balance
        raw = None
        if balance is not None and balance.options.cross_prompt and isinstance(dataset, Dataset) \
                and has_pair_texts(dataset):
            raw = dataset = numbered(dataset)  # each kept pair's prompt text is found again by row
        dataset = self.prepare(dataset, "train", count=balance is not None)
        if balance is not None and args.group_column and len(self.group_names) == 1:
            raise DataError(
                f"group_column='{args.group_column}' has one value ('{self.group_names[0]}') in the train dataset, so "
                "the balanced loss has no groups to balance; check the column, or leave group_column unset to balance "
                "length directions over all pairs."
            )
        if balance is not None and isinstance(dataset, Dataset):
            balance.fit(dataset["group_id"], dataset["response_lengths"])
            logger.info(f"Balanced loss: {json.dumps(balance.summary())}")
        if balance is not None and balance.options.cross_prompt:
            dataset = self.with_off_prompt_responses(dataset, raw)
        if isinstance(dataset, Dataset):
            warn_unused_ties(dataset, args, self.loss_fn, user_loss_fn)
        return dataset

    def prepare_eval(self, eval_dataset):
        """One eval set or a dict of them, prepared; with exploit_probes, the texts of each set of pair texts are kept
        (numbered, so that the rows preparation keeps are found again)."""
        named = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
        self.probe_sets = {name: numbered(data) for name, data in named.items() if self.args.exploit_probes
                           and isinstance(data, Dataset) and has_pair_texts(data)}
        prepared = {name: self.prepare(self.probe_sets.get(name, data), name) for name, data in named.items()}
        return prepared if isinstance(eval_dataset, dict) else prepared["eval"]

    def for_evaluation(self, eval_dataset, eval_sets, prefix: str) -> tuple:
        """What `trainer.evaluate(eval_dataset)` hands Trainer (a named set, the run's eval sets, or a new dataset
        prepared here), with the numbered texts the probes score (None without them) and the rows prepared from them."""
        texts, prepared = None, None
        if isinstance(eval_dataset, str):  # Trainer's name of one of several eval sets
            texts, prepared = self.probe_sets.get(eval_dataset), eval_sets[eval_dataset]
        elif eval_dataset is None and not isinstance(eval_sets, dict):
            texts, prepared = self.probe_sets.get("eval"), eval_sets
        elif isinstance(eval_dataset, Dataset) and self.args.exploit_probes and has_pair_texts(eval_dataset):
            texts = eval_dataset = numbered(eval_dataset)
        if isinstance(eval_dataset, (Dataset, IterableDataset)):  # a dict: Trainer comes back with each one
            eval_dataset = prepared = self.prepare(eval_dataset, prefix)
        return eval_dataset, texts, prepared

    def prepare(self, dataset, name: str, count: bool = False):
        """A dataset (or stream) prepared and given group ids; one already prepared (it has `group_id`) as it is."""
        if dataset is None or "group_id" in column_names(dataset):
            return dataset
        dropped = 0
        if self.args.attributes:  # each completion's scores checked, then carried as `attribute_scores`
            dataset, dropped = with_attribute_scores(dataset, self.args, name)
        if is_stream(dataset):
            return self.prepare_stream(dataset, name, count)
        lists = self.trains_lists or is_listwise(dataset)
        if self.loss_fn is LOSSES["hinge"] and not lists:  # before tokenising: rows named as the user's
            check_hinge_margins(dataset, name, self.hinge_margin())
        if self.args.attributes and is_single_responses(dataset):  # one scored response per row
            dataset, self.reports[name] = prepare_responses(dataset, self.tokenizer, self.args, name, self.max_length)
        else:
            dataset, self.reports[name] = prepare_dataset(dataset, self.tokenizer, self.args, name, self.max_length,
                                                          lists)
        if dropped:
            self.reports[name]["rows"] += dropped
            self.reports[name]["dropped"][BAD_SCORES] = dropped
        if self.loss_fn is LOSSES["graded"]:
            check_scored(dataset, name)  # before the model loads, not at the first unscored batch
        self.register_groups(sorted(set(dataset.unique("group")) - set(self.group_names)))
        return add_group_ids(dataset, {g: i for i, g in enumerate(self.group_names)})

    def prepare_stream(self, dataset, name: str, count: bool):
        """Tokenised and checked as rows stream by, group ids given on first sight. With `count`, one pass over the
        stream first, before the model is loaded: every row checked, the groups and unit sizes the balanced loss
        weighs by, exactly as for a dataset in memory."""
        dataset, self.reports[name] = prepare_stream(dataset, self.tokenizer, self.args, name, self.max_length,
                                                     self.trains_lists or is_listwise(dataset))
        if count:
            groups, lengths = count_stream(dataset, name, self.reports[name], self.args.on_bad_rows)
            self.register_groups(sorted(set(groups) - set(self.group_names)))  # in order, as for a dataset in memory
            index = {group: i for i, group in enumerate(self.group_names)}
            self.balance.fit([index[group] for group in groups], lengths)
        return dataset.map(self.stream_group_id, input_columns="group")

    def stream_group_id(self, group: str) -> dict:
        if group not in self.group_names:
            self.register_groups([group])  # every process reads the whole stream: the same ids everywhere
        return {"group_id": self.group_names.index(group)}

    def register_groups(self, names) -> None:
        self.group_names = self.group_names + list(names)
        if self.balance is not None:
            self.balance.add_groups(names)

    def hinge_margin(self) -> float:
        default = loss_option_defaults(self.loss_fn)["hinge_margin"]
        return float(self.args.loss_kwargs.get("hinge_margin", default))

    def with_off_prompt_responses(self, train_dataset, raw_train=None):
        """The train set with each pair's cross-prompt negative (see `cross_prompt.py`); partners fixed by the seed.
        `raw_train`: the numbered texts the pairs were prepared from (None for data given as token ids)."""
        if not isinstance(train_dataset, Dataset):
            raise ConfigError("loss_kwargs cross_prompt needs a train set of pairs in memory (it picks each pair's "
                              "partner among all prompts before training); set streaming: false, or cross_prompt: 0.")
        options = self.balance.options
        try:
            texts = None if raw_train is None else pair_texts(raw_train, train_dataset[ROW_COLUMN], None)[0]
            train_dataset = add_off_prompt_responses(train_dataset, texts, options.cross_prompt_partners,
                                                     self.args.seed, self.max_length)
        except ValueError as err:
            raise DataError(f"train: {err} Set loss_kwargs cross_prompt: 0.") from err
        logger.info(f"Cross-prompt negatives: every training pair also scores its prompt with another prompt's "
                    f"chosen response ({options.cross_prompt_partners} partners, weight {options.cross_prompt}).")
        return train_dataset
