"""`BalancedRewardTrainer`: a `transformers.Trainer` for reward models on pairs and lists, with pluggable losses.

The class is Trainer's hooks; the jobs they hand on live beside it: `preflight` (option checks before the model
loads), `run_data` (the datasets, prepared once), `modeling`, `forward` (scoring layouts), `row_losses`,
`checkpoint_hooks` (checkpoints, resume, stops), `run_lock`, `streaming`, `train_metrics` and `model_card`.
"""

import contextlib
import copy
import logging

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import EvalPrediction, PreTrainedModel, Trainer
from trl.models import get_act_offloading_ctx_manager

from . import attribute_training
from .balancing import BalanceOptions, balancer_for
from .callbacks import ClearOutsideGradients, RewardDriftCallback, SkipEmptySteps, StopOnSignal
from .checkpoint_hooks import non_finite_batch, resume_position, run_training, save_checkpoint, write_data_report
from .checkpoints import data_identity
from .collator import Layout, RewardCollator
from .config import BalancedRewardConfig, ConfigError, check_loss_kwargs
from .data import MODEL_COLUMNS, ROW_COLUMN, apply_token_options
from .forward import decide_layout_on, score_batch
from .listwise import is_listwise
from .losses import LEARN_TIE, LOSSES, as_list_loss, list_pairs, trains_lists
from .model_card import hub_files, push_output_dir, write_trainer_card
from .modeling import (config_and_tokenizer, load_model, make_length_head, make_log_tie, normalize_rewards,
                       ready_model, save_merged)
from .paths import resolve_model_path
from .preflight import (as_config, check_datasets, check_free_disk, check_hub_reachable, check_launch,
                        check_list_options, check_model_options, check_output_dir)
from .ranking import reward_metrics
from .row_losses import score_and_row_losses
from .run_data import RunData
from .run_lock import RunLock, claim_run_dir
from .streaming import (StreamPosition, length_grouped_dataloader, padded_eval_dataloader, reading_streams,
                        real_pairs)
from .train_metrics import TrainTotals, UnitLosses, all_finite, record_train_step, train_metrics

logger = logging.getLogger(__name__)

# Trainer's private methods overridden below, each for a job no public hook does. A transformers that renamed one would
# silently skip the override, so the import fails instead (pyproject.toml pins the range the suite ran on).
PRIVATE_OVERRIDES = {
    "_save_checkpoint": "write each checkpoint beside its folder and publish it whole, with the run's fingerprint",
    "_init_training_state": "resume a streamed train set at the pass and batch its checkpoint recorded",
    "_set_signature_columns_if_needed": "keep the prepared pair columns, which the model's forward does not name",
    "_get_output_dir": "point Trainer's checkpoint writing at the staging folder of _save_checkpoint",
    "_hp_search_setup": "a trial's loss_kwargs rebuild the balanced loss's state",
}
if missing := [name for name in PRIVATE_OVERRIDES if not callable(getattr(Trainer, name, None))]:
    import transformers

    raise ImportError(f"hf_balanced_reward needs Trainer.{', Trainer.'.join(missing)}, which transformers "
                      f"{transformers.__version__} does not have: pip install 'transformers>=5.24,<6'.")


class BalancedRewardTrainer(Trainer):
    """Trains an `AutoModelForSequenceClassification` (one output) on preference pairs.

    Takes the same arguments as `trl.RewardTrainer`, plus `loss_fn`, a callable
    `(chosen_rewards, rejected_rewards, margin=None, **loss_kwargs) -> per-pair loss` used instead of
    `LOSSES[args.loss_type]`, and Trainer's `model_init` (instead of `model`): a function of no argument or of the
    trial returning a model or its name, called for a fresh model at every train(), as `hyperparameter_search` needs.
    """

    # compute_loss returns a per-batch mean, so Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False
    # Model tags (Hub): trl.RewardTrainer's, so a model trained here is found as a trl reward model is, plus ours.
    _tag_names = ["trl", "reward-trainer", "hf_balanced_reward"]

    def __init__(self, model: str | PreTrainedModel | None = None, args: BalancedRewardConfig | None = None,
                 data_collator=None, train_dataset: Dataset | IterableDataset | None = None,
                 eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None, peft_config=None, loss_fn=None,
                 model_init=None):
        if (model is None) == (model_init is None):
            raise ConfigError("BalancedRewardTrainer needs model (a model or its name) or model_init (a function "
                              "returning one for every run, as hyperparameter_search needs), not both.")
        if model_init is not None:
            self.model_init = model_init
            model = super().call_model_init()  # set-up reads its model (or loads the model it names) as `model`
        model = resolve_model_path(model)  # `package:NAME/SUBDIR` as on the command line
        args = as_config(args, model)
        check_launch(args)
        check_output_dir(args)
        check_hub_reachable(args)
        self.dataset_names = check_datasets(args, train_dataset, eval_dataset)  # before the (slow) model load
        # The balanced loss's options are applied around the loss by its balancer (None for every other loss).
        self.balance = balancer_for(args.loss_type, args.loss_kwargs, loss_fn)
        self.loss_fn = loss_fn or LOSSES[args.loss_type]
        check_loss_kwargs(args.loss_kwargs, self.loss_fn, getattr(self.loss_fn, "__name__", "loss_fn"))
        # Every row is K completions with ranks (a pair is K = 2); a list or tie loss takes whole rows, a pairwise loss
        # each row's pairs. Lists (and pairs with ties) rule out what needs a pair's one length direction.
        self.pairwise = not trains_lists(self.loss_fn)
        self.trains_lists = not self.pairwise or (train_dataset is not None and is_listwise(train_dataset))
        if self.trains_lists:
            check_list_options(args, loss_fn)
        self._set_loss_options(args)
        self.base_model_name = model if isinstance(model, str) else model.config._name_or_path
        # Config, tokenizer and data first: every mistake they reveal surfaces before the weights are loaded.
        model_config, processing_class = config_and_tokenizer(model, processing_class, args)
        # trl.RewardConfig's token options, in trl's order: eos_token, chat_template_path, pad_token.
        added_tokens = apply_token_options(processing_class, args)
        self.max_length = check_model_options(args, model_config, processing_class)  # cut to the model's positions

        self.run_data = RunData(processing_class, args, self.loss_fn, self.balance, self.trains_lists, self.max_length)
        train_dataset = self.run_data.prepare_train(train_dataset, loss_fn)
        if args.attributes:  # standardize: true is measured on the prepared train set
            self.loss_options = attribute_training.loss_options(args, train_dataset)
        self.train_data_id = data_identity(train_dataset)  # the prepared rows' content: for the run's fingerprint
        eval_dataset = self.run_data.prepare_eval(eval_dataset)

        given = {name: data for name, data in {"train": train_dataset, **(eval_dataset if isinstance(eval_dataset, dict)
                 else {"eval": eval_dataset})}.items() if isinstance(data, Dataset)}
        self._added_tokens = added_tokens  # model_init's models are readied as this one is
        self.layout = Layout()  # the run's one layout, shared with the collator; chosen afresh for each model
        model = ready_model(load_model(model, args) if isinstance(model, str) else model, processing_class, args,
                            added_tokens, self.max_length, self.layout, peft_config, given)
        self._peft_config = peft_config

        self.user_compute_metrics = compute_metrics
        # Wider packed rows waste less padding but cost more attention: two sequences' worth.
        data_collator = data_collator or RewardCollator(processing_class.pad_token_id, args.pad_to_multiple_of,
                                                        self.layout, max_row_tokens=2 * (self.max_length or 1024))
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=self._reward_metrics, callbacks=callbacks, optimizers=optimizers,
                         optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        # Evaluation calls compute_loss only when the model "can return a loss" and there are no label columns.
        self.can_return_loss = True
        self.label_names = []
        self.model_init = model_init  # Trainer's own check refuses model and model_init together
        self.stream_state = StreamPosition()  # where a streamed train set is read up to
        self._fresh_trained_state()
        self.signal_stop = StopOnSignal(self.accelerator)
        self.add_callback(self.signal_stop)
        self.skip_steps = SkipEmptySteps(self.accelerator)  # nan_policy skip: a skipped step changes nothing
        self.add_callback(self.skip_steps)
        self.add_callback(ClearOutsideGradients(self._outside_parameters))
        self.finished_checkpoint = None  # set when train() resumes a checkpoint at or past the run's last step
        self.output_dir_lock = RunLock(args.output_dir)  # held by train() on process zero (see `run_lock`)
        self.saved_here, self.writing_to = set(), None  # checkpoints of this run; where a checkpoint is being written
        if args.reward_drift_limit is not None:
            self.add_callback(RewardDriftCallback(args.reward_drift_limit))
        if self.accelerator.dataloader_config.dispatch_batches is None:
            # accelerate's default for streams: one process reads and sends batches, and cuts the last one by a count
            # of first-dimension rows, which are not pairs here (eval pairs went missing). Each process reads instead.
            self.accelerator.dataloader_config.dispatch_batches = False
        self.offload_activations = get_act_offloading_ctx_manager(model=self.model) if args.activation_offloading else None
        self.model.add_model_tags(self._tag_names)  # what a trl-trained reward model carries on the Hub

    # --- setup -------------------------------------------------------------------------------------------------

    _as_config = staticmethod(as_config)  # tests and users call it on the class

    @property
    def stream_position(self) -> dict:
        """Where a streamed train set is read up to: its pass (Trainer's epoch) and the batches read into it."""
        return self.stream_state.position

    def call_model_init(self, trial=None):
        """The fresh model of a run (train() asks for one at every start; under `hyperparameter_search`, with the
        trial): `model_init`'s model, or the model it names loaded as `model` would be, readied as __init__'s was."""
        model = resolve_model_path(super().call_model_init(trial))
        if isinstance(model, str):
            model = load_model(model, self.args)
        peft_config = copy.deepcopy(self._peft_config)  # wrap_peft adds the head to it: once per model
        model = ready_model(model, self.processing_class, self.args, self._added_tokens, self.max_length, self.layout,
                            peft_config)
        if self.args.activation_offloading:
            self.offload_activations = get_act_offloading_ctx_manager(model=model)
        model.add_model_tags(self._tag_names)
        return model

    def _hp_search_setup(self, trial) -> None:
        """Trainer sets a trial's options on `args`; the loss's options read from them at __init__ are read again
        (a trial may set `loss_kwargs`), and what training learns besides the model starts afresh for each trial."""
        super()._hp_search_setup(trial)
        if trial is None or self.hp_search_backend is None:
            return
        args = self.args
        args.validate_reward_options()  # a trial's loss_kwargs, checked as a recipe's are
        check_loss_kwargs(args.loss_kwargs, self.loss_fn, getattr(self.loss_fn, "__name__", "loss_fn"))
        self._set_loss_options(args)
        if args.attributes:
            self.loss_options = attribute_training.loss_options(args, self.train_dataset)
        if self.balance is not None:  # the groups, unit sizes and length slopes come from the data, kept
            self.balance.restart(BalanceOptions(**args.loss_kwargs))
        self._fresh_trained_state()

    def _fresh_trained_state(self) -> None:
        """What training learns or counts besides the model, as it is before the first step."""
        args = self.args
        self.train_totals, self.unit_losses = TrainTotals(self.accelerator), UnitLosses(self.accelerator)
        self.skipped_batches, self.micro_batches = 0, 0
        # Trained with the model (see `create_optimizer`), kept in checkpoints, never saved with the model.
        self.length_head, self.log_tie = None, None
        if self.balance is not None and self.balance.options.length_head:
            self.length_head = make_length_head(self.model, args.device, self.accelerator)
        if args.loss_kwargs.get(LEARN_TIE):
            self.log_tie = make_log_tie(args.loss_kwargs.get("log_tie", 0.0), args.device, self.accelerator)

    def _outside_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters beside the model: the length head's and log_tie (see `create_optimizer`)."""
        head = list(self.length_head.parameters()) if self.length_head is not None else []
        return head + ([self.log_tie] if self.log_tie is not None else [])

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        # Trainer keeps its optimizer across train() calls on one trainer: add what it does not hold yet, once.
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if new := [p for p in self._outside_parameters() if id(p) not in held]:
            optimizer.add_param_group({"params": new, "weight_decay": 0.0})
        if self.args.nan_policy == "skip" and not self.is_deepspeed_enabled:  # DeepSpeed steps inside its engine
            self.skip_steps.guard(optimizer)
        return optimizer

    def save_merged_model(self, output_dir: str) -> None:
        """Save a LoRA-trained model with its adapters folded in: loads as a plain AutoModelForSequenceClassification.

        Reloads the adapters saved by `save_model` in `args.output_dir` (call that first), so the model being
        trained is left as it is.
        """
        if not is_peft_model(self.model):
            raise ConfigError("save_merged_model needs a model trained with peft_config (LoRA adapters).")
        if self.args.should_save:
            save_merged(self.args.output_dir, output_dir, self.processing_class, self.model.dtype,
                        self.args.trust_remote_code)

    @property
    def group_names(self) -> list[str]:
        """The groups of the run's data in order of first sight; a row's group_id indexes them (`run_data`)."""
        return self.run_data.group_names

    @property
    def data_report(self) -> dict[str, dict]:
        """Per dataset: rows, pairs (or lists) kept, truncated, empty responses, dropped per reason."""
        return self.run_data.reports

    def get_train_dataloader(self):
        self._decide_layout(self.train_dataset)
        loader = length_grouped_dataloader(self)  # a stream batched by length; None: Trainer's
        return super().get_train_dataloader() if loader is None else loader

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        dataset = self.eval_dataset[dataset] if isinstance(dataset, str) else dataset
        self._decide_layout(dataset)
        loader = padded_eval_dataloader(self, dataset, "Evaluation")  # a stream on several processes; None: Trainer's
        return super().get_eval_dataloader(eval_dataset) if loader is None else loader

    def get_test_dataloader(self, test_dataset):
        self._decide_layout(test_dataset)
        loader = padded_eval_dataloader(self, test_dataset, "test")
        return super().get_test_dataloader(test_dataset) if loader is None else loader

    def _set_signature_columns_if_needed(self):
        # Trainer drops dataset columns that the model's forward does not name; keep the ones the collator needs.
        if self._signature_columns is None:
            self._signature_columns = MODEL_COLUMNS

    # --- training, checkpoints and resume (the work is `checkpoint_hooks`'s) ---------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """Trainer's train, holding output_dir for the run: a second run into it is refused while this one trains,
        and a new run over an earlier run's checkpoints needs overwrite_output_dir (see `run_lock`)."""
        try:
            # Under hyperparameter_search each trial is a run in its own folder (Trainer's output_dir/run-N).
            self._claim_output_dir(resume_from_checkpoint, run_dir=self._get_output_dir(trial))
            if self.model is not None:  # None between hyperparameter_search's trials: model_init makes the next
                check_free_disk(self.args, self.model)  # on every process: all refuse together, none waits
            return run_training(self, super().train, resume_from_checkpoint, trial, **kwargs)
        finally:
            self.output_dir_lock.release()

    @contextlib.contextmanager
    def holding_output_dir(self):
        """Keep output_dir locked beyond train(), e.g. through the final save, metrics and model card that follow it
        (train() takes the lock again inside)."""
        try:
            self._claim_output_dir(new_run=False)
            yield self
        finally:
            self.output_dir_lock.release()

    def _claim_output_dir(self, resume=None, new_run: bool = True, run_dir: str | None = None) -> None:
        run_dir = run_dir or self.args.output_dir
        if not self.output_dir_lock.depth:  # output_dir may have been changed since __init__
            self.output_dir_lock = RunLock(run_dir)
        claim_run_dir(self.output_dir_lock, run_dir, self.accelerator, self.is_world_process_zero(), new_run, resume,
                      self.args.overwrite_output_dir)

    def normalize_rewards(self, dataset: Dataset | None = None) -> dict:
        """Fold the standardisation of rewards on `dataset` (default: the eval set, else up to 1,000 training pairs)
        into the reward head, and record it in the model's config as `reward_normalization`."""
        return normalize_rewards(self, dataset)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial) -> tuple[int, int]:
        """(epoch, batches into it) to resume at: a streamed run's from its checkpoint (`resume_position`)."""
        epoch, batches = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                      resume_from_checkpoint, trial)
        return resume_position(self, epoch, batches, resume_from_checkpoint, max_steps, num_train_epochs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's next batches (those of one optimizer step), counted into `stream_position` once read (a read that
        fails counts none)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.stream_state.read(epoch_iterator, len(batches), self.state.global_step)
        return batches, num_items

    def _get_output_dir(self, trial) -> str:
        # While `_save_checkpoint` runs Trainer's: the staging folder that Trainer writes the checkpoint into.
        return getattr(self, "writing_to", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, published whole with the reward state (`checkpoint_hooks.save_checkpoint`)."""
        save_checkpoint(self, model, trial, write=super()._save_checkpoint)

    # --- saving, model card, Hub ----------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:  # a final save, not a checkpoint: give it a card
            if self.args.export_combined:  # beside it, the one-output model of the weighted attributes
                attribute_training.export_combined(self, output_dir or self.args.output_dir)
            self.write_card(output_dir or self.args.output_dir)

    def write_card(self, output_dir: str, repo: str | None = None) -> str:
        return write_trainer_card(self, output_dir, repo)

    def create_model_card(self, *args, **kwargs) -> None:
        if self.is_world_process_zero():
            self.write_card(self.args.output_dir, repo=self.hub_model_id)

    hub_files = staticmethod(hub_files)  # the files `push_to_hub` uploads (see `model_card.hub_files`)

    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, token: str | None = None,
                    revision: str | None = None, **kwargs):
        """Upload the model, tokenizer, card and plots (exactly `hub_files`) to `hub_model_id`."""
        return push_output_dir(self, commit_message, blocking, token, revision)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        eval_dataset, texts, prepared = self.run_data.for_evaluation(eval_dataset, self.eval_dataset, metric_key_prefix)
        with reading_streams():
            metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if any(report.get("streamed") for report in self.data_report.values()):
            write_data_report(self, self.args.output_dir)  # a streamed set's counts grew as it was read
        if texts is not None and isinstance(prepared, Dataset) and ROW_COLUMN in prepared.column_names:
            from .probes import probe_metrics  # imports scikit-learn: only when there are probes to compute

            metrics.update(probe_metrics(self, texts, sorted(prepared[ROW_COLUMN]), metric_key_prefix))
        return metrics

    # --- forward and loss --------------------------------------------------------------------------------------

    def training_step(self, *args, **kwargs):
        if self.offload_activations is None:
            return super().training_step(*args, **kwargs)
        with self.offload_activations:
            return super().training_step(*args, **kwargs)

    @property
    def shared_prompt(self) -> bool:
        """Whether batches are packed with a shared prompt (see `collator.Layout`)."""
        return self.layout.shared_prompt

    def score(self, model, inputs, with_features: bool = False) -> tuple:
        """(rewards [rows, K], off-prompt rewards [rows] or None, head features or None) of a collated batch, in one
        forward pass (`forward.score_batch`)."""
        return score_batch(model, inputs, with_features)

    def _decide_layout(self, dataset) -> None:
        decide_layout_on(dataset, self.layout, self.data_collator, self.model, self.processing_class.pad_token_id,
                         self.args)

    def _set_loss_options(self, args) -> None:
        """The options the loss function is called with: `loss_kwargs`, but none for the balanced loss (its balancer
        applies them) and never `learn_tie` (the trainer's); a list or tie loss is wrapped to take whole rows."""
        self.loss_options = {} if self.balance is not None else {
            k: v for k, v in args.loss_kwargs.items() if k != LEARN_TIE}
        self.list_loss = None if self.pairwise else as_list_loss(self.loss_fn, self.loss_options)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One loss per row (a pair, a list; see `row_losses`), then one weighted mean over the batch's rows."""
        mask, attribute_rewards = inputs["list_mask"], None
        if self.args.attributes:  # one head output per attribute, trained on their scores; metrics read their sum
            rewards, per_row, attribute_rewards = attribute_training.score_and_losses(self, model, inputs)
            pairs, off_prompt = list_pairs(rewards, inputs["ranks"], mask), None
            pair_losses, penalty = per_row[:, None].expand_as(pairs.chosen), None
        else:
            rewards, pairs, per_row, pair_losses, penalty, off_prompt = score_and_row_losses(self, model, inputs)
        weights = inputs.get("weight")
        weighted = per_row if weights is None else weights * per_row
        loss = weighted.mean() if penalty is None else weighted.mean() + penalty
        if model.training:
            self.micro_batches += 1
            if not all_finite(self.accelerator, loss, rewards[mask]):
                return non_finite_batch(self, model, loss, rewards[mask])
            self.skip_steps.batch(loss)
            with torch.no_grad():
                record_train_step(self, pairs, pair_losses, inputs, off_prompt)
        outputs = {"rewards": rewards, "losses": weighted}
        if attribute_rewards is not None:
            outputs["attribute_rewards"] = attribute_rewards
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.skip_steps.fix_logs(logs)  # the loss of the micro-batches that trained, not a skipped one's 0
        if self.model.training and self.train_totals.totals is not None:
            logs.update(train_metrics(self))
        if self.model.training and self.skipped_batches:
            logs["skipped_batches"] = self.skipped_batches
        super().log(logs, start_time)

    # --- evaluation --------------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        # Trainer pads K across batches with -100, so the mask travels as 1 / 0.
        group_ids = inputs.get("group_id", torch.zeros_like(outputs["losses"], dtype=torch.long))
        predictions = (outputs["rewards"], outputs["losses"].detach())
        labels = (group_ids, inputs["ranks"], inputs["list_mask"].long(), inputs["response_lengths"])
        if "attribute_rewards" in outputs:  # per attribute: the head's outputs and the expert scores
            predictions = predictions + (outputs["attribute_rewards"],)
            labels = labels + (inputs["attribute_scores"],) + ((inputs["completion_keys"],)
                                                               if "completion_keys" in inputs else ())
        return loss.detach(), predictions, labels

    def _reward_metrics(self, eval_prediction: EvalPrediction) -> dict[str, float]:
        (rewards, losses, *attribute_rewards), (group_ids, ranks, mask, lengths, *expert) = real_pairs(eval_prediction)
        metrics = reward_metrics(rewards, losses, group_ids, ranks, mask == 1, lengths, self.group_names or ["all"],
                                 self.user_compute_metrics)
        if attribute_rewards:  # expert: the scores [rows, K, A] and the completions' content keys [rows, K]
            metrics.update(attribute_training.evaluation_metrics(attribute_rewards[0], expert[0], mask,
                                                                 self.args.attributes, (expert + [None])[1]))
        return metrics
