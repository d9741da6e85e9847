"""`BalancedRewardTrainer`: a `transformers.Trainer` for pairwise reward models with pluggable losses.

The class is Trainer's hooks; the jobs they hand on live beside it: `preflight` (option checks before the model
loads), `modeling`, `forward` (scoring layouts), `checkpoints`, `streaming`, `train_metrics` and `model_card`.
"""

import contextlib
import copy
import logging
import os
import shutil

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer, EvalPrediction, PreTrainedModel, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl.models import get_act_offloading_ctx_manager

from .balancing import BalanceOptions, balancer_for
from .callbacks import ClearOutsideGradients, RewardDriftCallback, SkipEmptySteps, StopOnSignal
from .checkpoints import (FINGERPRINT, check_fingerprint, check_same_model, data_identity, has_final_model,
                          is_complete_checkpoint, publish_checkpoint, read_reward_state, remove_unpublished,
                          resolve_checkpoint, restore_reward_state, reward_state, staging_dir, wants_resume,
                          write_json_atomically)
from .collator import Layout, RewardCollator
from .config import BalancedRewardConfig, ConfigError, check_loss_kwargs
from .data import (MODEL_COLUMNS, ROW_COLUMN, DataError, apply_token_options, check_columns, column_names,
                   has_pair_texts, is_stream, numbered, pair_texts)
from .errors import TrainingStopped
from .forward import decide_layout, score_batch
from .listwise import is_listwise
from .losses import LEARN_TIE, LOSSES, as_list_loss, list_pairs, trains_lists
from .metrics import metric_name
from .model_card import hub_files, write_model_card
from .modeling import (find_reward_head, load_config_and_tokenizer, load_model, make_length_head, make_log_tie,
                       normalize_head, prepare_model, save_merged, skeleton_model, use_shared_prompt, wrap_peft)
from .paths import dataset_label, resolve_model_path
from .preflight import (as_config, check_free_disk, check_hub_reachable, check_launch, check_list_options,
                        check_model_options, check_output_dir, check_stream_options, check_token_ids)
from .preparation import report_summary
from .ranking import reward_metrics
from .row_losses import list_row_losses, pairwise_row_losses
from .run_data import RunData
from .run_lock import RunLock, check_new_run, delete_set_aside
from .streaming import LengthGroupedStream, PaddedStream, StreamPosition, reading_streams, real_pairs
from .train_metrics import TrainTotals, UnitLosses, all_finite

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

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        args: BalancedRewardConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        peft_config=None,
        loss_fn=None,
        model_init=None,
    ):
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
        named_datasets = {"train": train_dataset, **(eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset})}
        # How the card names each dataset (no local paths); the CLI replaces them with the names it was given.
        self.dataset_names = {name: dataset_label(data) for name, data in named_datasets.items() if data is not None}
        for name, dataset in named_datasets.items():
            if dataset is not None and "group_id" not in column_names(dataset) and not is_listwise(dataset):
                check_columns(dataset, args.group_column, name)  # before the (slow) model load
        if is_stream(train_dataset):
            check_stream_options(args)
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
        model_id = model if isinstance(model, str) else None
        if model_id:
            model_config, loaded_tokenizer = load_config_and_tokenizer(model_id, args)
            processing_class = processing_class or loaded_tokenizer
            if args.shared_prompt:
                use_shared_prompt(skeleton_model(model_config, args), args)
        else:
            model_config = model.config
            processing_class = processing_class or AutoTokenizer.from_pretrained(model.config._name_or_path)
        # trl.RewardConfig's token options, in trl's order: eos_token, chat_template_path, pad_token.
        added_tokens = apply_token_options(processing_class, args)
        self.max_length = check_model_options(args, model_config, processing_class)  # cut to the model's positions

        self.run_data = RunData(processing_class, args, self.loss_fn, self.balance, self.trains_lists, self.max_length)
        train_dataset = self.run_data.prepare_train(train_dataset, loss_fn)
        self.train_data_id = data_identity(train_dataset)  # the prepared rows' content: for the run's fingerprint
        eval_dataset = self.run_data.prepare_eval(eval_dataset)

        given = {name: data for name, data in {"train": train_dataset, **(eval_dataset if isinstance(eval_dataset, dict)
                 else {"eval": eval_dataset})}.items() if isinstance(data, Dataset)}
        self._added_tokens = added_tokens  # model_init's models are readied as this one is
        model = self._ready_model(load_model(model_id, args) if model_id else model, processing_class, args,
                                  peft_config, given)
        self._peft_config = peft_config

        self.user_compute_metrics = compute_metrics
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or self._default_collator(processing_class.pad_token_id, args),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=self._reward_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
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
        self._saved_here, self._writing_to = set(), None  # checkpoints of this run; where a checkpoint is being written
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

    def _ready_model(self, model, processing_class, args, peft_config, token_check_sets=None):
        """A loaded model matched to the tokenizer, its layout chosen, LoRA-wrapped when asked: `model` in __init__,
        and every model `model_init` gives."""
        prepare_model(model, processing_class, args, self._added_tokens, self.max_length)
        if token_check_sets:
            check_token_ids(token_check_sets, model.get_input_embeddings().num_embeddings)  # resized, not yet wrapped
        # One object for the run, shared with the collator; each model gets its layout chosen and checked afresh.
        self.layout = getattr(self, "layout", None) or Layout()
        self.layout.shared_prompt, self.layout.decided = use_shared_prompt(model, args), False
        if peft_config is not None:
            model = wrap_peft(model, peft_config, args, self._added_tokens)
        find_reward_head(model)  # fail now, not at the first step, if there is no one-output head
        return model

    def call_model_init(self, trial=None):
        """The fresh model of a run (train() asks for one at every start; under `hyperparameter_search`, with the
        trial): `model_init`'s model, or the model it names loaded as `model` would be, readied as __init__'s was."""
        model = resolve_model_path(super().call_model_init(trial))
        if isinstance(model, str):
            model = load_model(model, self.args)
        peft_config = copy.deepcopy(self._peft_config)  # wrap_peft adds the head to it: once per model
        model = self._ready_model(model, self.processing_class, self.args, peft_config)
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
        if self.balance is not None:  # the groups, unit sizes and length slopes come from the data, kept
            self.balance.restart(BalanceOptions(**args.loss_kwargs))
        self._fresh_trained_state()

    def _fresh_trained_state(self) -> None:
        """What training learns or counts besides the model, as it is before the first step."""
        args = self.args
        self.train_totals, self.unit_losses = TrainTotals(self.accelerator), UnitLosses(self.accelerator)
        self.skipped_batches, self._micro_batches = 0, 0
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

    def _default_collator(self, pad_token_id, args) -> RewardCollator:
        return RewardCollator(
            pad_token_id,
            args.pad_to_multiple_of,
            shared_prompt=self.layout,
            max_row_tokens=2 * (self.max_length or 1024),  # wider rows waste less padding but cost more attention
        )

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
        """A streamed train set with train_sampling_strategy="group_by_length" is batched by length from a buffer
        (see `streaming.LengthGroupedStream`); transformers would ignore the option for a stream."""
        self._decide_layout(self.train_dataset)
        if not (is_stream(self.train_dataset) and self.args.train_sampling_strategy == "group_by_length"):
            return super().get_train_dataloader()
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        grouped = LengthGroupedStream(self.train_dataset, self._train_batch_size * self.args.world_size, seed,
                                      length_column=self.args.length_column_name)
        return self._get_dataloader(grouped, "Training", self._train_batch_size, is_training=True)

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        dataset = self.eval_dataset[dataset] if isinstance(dataset, str) else dataset
        self._decide_layout(dataset)
        if is_stream(dataset) and self.args.world_size > 1:
            return self._padded_stream_dataloader(dataset, "Evaluation")
        return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        self._decide_layout(test_dataset)
        if is_stream(test_dataset) and self.args.world_size > 1:
            return self._padded_stream_dataloader(test_dataset, "test")
        return super().get_test_dataloader(test_dataset)

    def _padded_stream_dataloader(self, dataset, description: str):
        """A streamed eval set on several processes: padded to whole global batches with marked pairs that
        `_reward_metrics` drops, so that every pair is scored once (see `streaming.PaddedStream`)."""
        padded = PaddedStream(dataset, self.args.eval_batch_size * self.args.world_size)
        return self._get_dataloader(padded, description, self.args.eval_batch_size)

    def _set_signature_columns_if_needed(self):
        # Trainer drops dataset columns that the model's forward does not name; keep the ones the collator needs.
        if self._signature_columns is None:
            self._signature_columns = MODEL_COLUMNS

    # --- training, checkpoints and resume -----------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """Trainer's train, holding output_dir for the run: a second run into it is refused while this one trains,
        and a new run over an earlier run's checkpoints needs overwrite_output_dir (see `run_lock`)."""
        try:
            # Under hyperparameter_search each trial is a run in its own folder (Trainer's output_dir/run-N).
            self._claim_output_dir(resume_from_checkpoint, run_dir=self._get_output_dir(trial))
            if self.model is not None:  # None between hyperparameter_search's trials: model_init makes the next
                check_free_disk(self.args, self.model)  # on every process: all refuse together, none waits
            return self._train_owned(resume_from_checkpoint, trial, **kwargs)
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
        """On world process zero: lock the run's folder (`run_dir`, default output_dir); for a run (`new_run`), delete
        what a killed save left, and refuse (or set aside) an earlier run's checkpoints unless it resumes. The other
        processes share the folder and stop with process zero's refusal."""
        refusal = None
        run_dir = run_dir or self.args.output_dir
        if self.is_world_process_zero():
            if not self.output_dir_lock.depth:  # args.output_dir may have been changed since __init__
                self.output_dir_lock = RunLock(run_dir)
            try:
                self.output_dir_lock.acquire()
                if new_run:
                    remove_unpublished(run_dir)
                if new_run and not wants_resume(resume):
                    check_new_run(run_dir, self.args.overwrite_output_dir)
            except ConfigError as err:
                refusal = err
        if self.accelerator.num_processes > 1:
            message = broadcast_object_list([str(refusal) if refusal else None])[0]
            refusal = refusal or (ConfigError(message) if message else None)
        if refusal:
            raise refusal

    def _train_owned(self, resume_from_checkpoint, trial, **kwargs):
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        self.stream_state.resumed, self.finished_checkpoint = None, None
        self._saved_here = {os.path.realpath(checkpoint)} if checkpoint else set()
        if checkpoint:
            self._load_reward_state(checkpoint)
        run_dir = self._get_output_dir(trial)  # a trial's own folder under hyperparameter_search
        if self.args.should_save and self.data_report:
            os.makedirs(run_dir, exist_ok=True)
            write_json_atomically(os.path.join(run_dir, "data_report.json"), self.data_report)
        try:
            with reading_streams():
                result = super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)
        except DataError as err:  # a bad row or unreadable line reached as the stream was read
            self.signal_stop.on_train_end(self.args, self.state, self.control)  # give back the signal handlers
            raise DataError(self._save_stopped_on_data(err)) from err
        finally:
            self.stream_state.iterator = None  # an unfinished pass's iterator holds its loader workers
        streamed = {name: report for name, report in self.data_report.items() if report.get("streamed")}
        if streamed and self.args.should_save:  # their counts grew as the rows streamed by
            for name, report in streamed.items():
                if summary := report_summary(name, report, self.args.on_bad_rows):
                    logger.warning(summary + " (rows read in the last pass over the stream)")
            write_json_atomically(os.path.join(run_dir, "data_report.json"), self.data_report)
        if self.args.normalize_rewards:
            self.normalize_rewards()
        if self.finished_checkpoint:
            self._finish_without_steps(self.finished_checkpoint)
        if "train_loss" in result.metrics:  # `SkipEmptySteps.fix_logs` left skipped batches out of it
            result = result._replace(training_loss=result.metrics["train_loss"])
        if self.is_world_process_zero():  # overwrite_output_dir: the earlier run's checkpoints, now replaced
            delete_set_aside(run_dir)
        return result

    def _finish_without_steps(self, checkpoint: str) -> None:
        """After a resume from a checkpoint at or past the run's last step, which trained nothing: save the final
        model if `output_dir` has none that reads back whole (a kill during the final save leaves such a run)."""
        missing = torch.tensor(float(not has_final_model(self.args.output_dir)), device=self.args.device)
        if self.accelerator.num_processes > 1:  # every process saves, or none (FSDP gathers the weights to save)
            missing = self.accelerator.reduce(missing, reduction="sum")
        save = bool(missing.item())
        if save:
            self.save_model()
        logger.warning(f"{os.path.basename(os.path.normpath(checkpoint))} is at step {self.state.global_step} of "
                       f"{self.state.max_steps}: nothing left to train; {'saved' if save else 'kept'} the final model "
                       f"in {self.args.output_dir}.")

    def _save_stopped_on_data(self, err: DataError) -> str:
        """The message for a run that data stopped mid-training, after saving what it had trained.

        Data stops a step before its forward pass (Trainer reads every micro-batch of a step first) or in an
        evaluation after one: either way the weights, optimizer and scheduler are those of the last finished step,
        a consistent state to save, as a SIGTERM or NaN stop saves it. The bad row was never in a trained batch, so
        fixing it (or dropping it with on_bad_rows: skip) does not change the batches the resumed run skips."""
        step = self.state.global_step
        if self.args.should_save and self.data_report:  # the counts of the rows read up to the stop
            write_json_atomically(os.path.join(self.args.output_dir, "data_report.json"), self.data_report)
        if step == 0:
            return f"{err} Nothing was trained yet."
        checkpoint = os.path.join(self._get_output_dir(trial=None), f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if not is_complete_checkpoint(checkpoint):
            self._save_checkpoint(self.model_wrapped, trial=None)
        return (f"{err} Training stopped after step {step} of {self.state.max_steps}; saved it to {checkpoint}. "
                f"Resume with --resume_from_checkpoint {checkpoint} (resume_from_checkpoint= in Python): the run reads "
                "on from that step's position in the stream.")

    def normalize_rewards(self, dataset: Dataset | None = None) -> dict:
        """Fold the standardisation of rewards on `dataset` (default: the eval set, else up to 1,000 training pairs)
        into the reward head, and record it in the model's config as `reward_normalization`."""
        if dataset is None:
            dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
            dataset = next(iter(dataset.values())) if isinstance(dataset, dict) else dataset
            dataset = dataset.take(1000) if is_stream(dataset) else dataset.select(range(min(len(dataset), 1000)))
        predictions, labels = real_pairs(self.predict(dataset, metric_key_prefix="normalize"))
        pairs = len(predictions[0])  # pairs, or lists
        rewards = predictions[0][labels[2] == 1].astype(np.float64)  # the real completions'
        mean, std = float(rewards.mean()), float(rewards.std())
        if not std > 0:
            raise TrainingStopped(f"normalize_rewards: the rewards on {pairs} pairs all equal {mean}; there is "
                                  "no scale to normalise.")
        return normalize_head(self.accelerator.unwrap_model(self.model), mean, std, pairs)

    def _resolve_checkpoint(self, resume) -> str | None:
        return resolve_checkpoint(self.args.output_dir, resume)

    def run_fingerprint(self) -> dict:
        """What defines this run: written into every checkpoint, compared on resume (`checkpoints.check_fingerprint`)."""
        model = self.base_model_name
        if isinstance(model, str) and os.path.isdir(model):
            model = os.path.realpath(model)
        return {"model": model, "loss_type": self.args.loss_type, "loss_kwargs": self.args.loss_kwargs,
                "train_data": self.train_data_id, "max_length": self.args.max_length,
                "group_names": list(self.group_names), "seed": self.args.seed}

    def _load_reward_state(self, checkpoint: str) -> None:
        check_same_model(checkpoint, self.accelerator.unwrap_model(self.model).config)
        check_fingerprint(checkpoint, self.run_fingerprint())
        streamed = is_stream(self.train_dataset)
        state = read_reward_state(checkpoint, self.group_names, streamed)
        self.run_data.register_groups(state["group_names"][len(self.group_names):])
        restore_reward_state(state, self.balance, self.length_head, self.log_tie)
        self.skipped_batches = state["skipped_batches"]
        self.train_totals.num_tokens = state.get("num_tokens", 0)  # absent before versions that recorded it
        self.stream_state.resumed = state.get("stream_position")  # absent before versions that recorded it

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial) -> tuple[int, int]:
        """(epoch, batches into it) to resume at. Trainer sees a stream as one epoch of max_steps x
        gradient_accumulation_steps batches and skips global_step x gradient_accumulation_steps batches from its start:
        past the stream's first pass, that skip runs off the end of the pass and the run goes on from the next pass's
        first batch. A streamed run resumes instead at the pass and batch its checkpoint recorded (`stream_position`),
        with that pass's epoch (group_by_length's seeded order)."""
        epoch, batches = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                      resume_from_checkpoint, trial)
        if is_stream(self.train_dataset) and not self.args.ignore_data_skip and resume_from_checkpoint is not None:
            if (position := self.stream_state.resumed) is not None:
                epoch, batches = position["pass"], position["batches"]
            else:
                logger.warning(f"checkpoint '{resume_from_checkpoint}' does not record its position in the stream (an "
                               f"earlier version wrote it): skipping {batches} batches from the stream's start, which "
                               "is the right position only if the run was still in its first pass over the stream.")
        self.stream_state.start(epoch, batches, self.state.global_step)
        if resume_from_checkpoint is not None and self.state.global_step >= max_steps:
            # Trainer checks for the end only after a step, so it would train one step past the end (checkpoint-5 of
            # 4). Starting after the last epoch trains none; `train` then saves the final model if it is missing.
            self.finished_checkpoint = resume_from_checkpoint
            return num_train_epochs, 0
        return epoch, batches

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's next batches (those of one optimizer step), counted into `stream_position` once read (a read that
        fails counts none)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.stream_state.read(epoch_iterator, len(batches), self.state.global_step)
        return batches, num_items

    def _get_output_dir(self, trial) -> str:
        # While `_save_checkpoint` runs Trainer's: the staging folder that Trainer writes the checkpoint into.
        return getattr(self, "_writing_to", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written beside its place and published whole (`checkpoints.publish_checkpoint`), so
        a kill mid-write never leaves a checkpoint-N that looks complete. A step this run has saved (or resumed from)
        is not written again: it holds the same state (a NaN stop right after a save_steps checkpoint)."""
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if os.path.realpath(folder) in self._saved_here:
            logger.info(f"{folder} already holds step {self.state.global_step}: kept as it was written.")
            return
        staged = staging_dir(folder)
        if self.args.should_save:
            shutil.rmtree(os.path.dirname(staged), ignore_errors=True)  # left by a save that failed
        self.accelerator.wait_for_everyone()
        # Old checkpoints are rotated away (save_total_limit) and pushed only once the new one is in place.
        limit, push = self.args.save_total_limit, self.args.push_to_hub
        self.args.save_total_limit, self.args.push_to_hub, self._writing_to = None, False, os.path.dirname(staged)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit, self.args.push_to_hub, self._writing_to = limit, push, None
        best = self.state.best_model_checkpoint
        if best and os.path.dirname(best) == os.path.dirname(staged):  # Trainer named it where it was written
            self.state.best_model_checkpoint = folder
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are written
        num_tokens = self.train_totals.tokens_so_far()  # a collective: before the main process goes on alone
        if self.args.should_save:
            streamed = is_stream(self.train_dataset)
            position = self.stream_state.of_finished_steps(self.state.global_step) if streamed else None
            state = reward_state(self.group_names, self.balance, self.skipped_batches, position, self.length_head,
                                 self.log_tie, num_tokens)
            publish_checkpoint(staged, folder, {**state, FINGERPRINT: self.run_fingerprint()})
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            delete_set_aside(run_dir)
        self.accelerator.wait_for_everyone()  # in place before any process reads it
        self._saved_here.add(os.path.realpath(folder))
        if push:
            self._push_from_checkpoint(folder)

    # --- saving, model card, Hub ----------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:  # a final save, not a checkpoint: give it a card
            self.write_card(output_dir or self.args.output_dir)

    def write_card(self, output_dir: str, repo: str | None = None) -> str:
        evals = [log for log in self.state.log_history if any(k.startswith("eval_") for k in log)]
        return write_model_card(output_dir, self.args, self.base_model_name, evals[-1] if evals else {},
                                self.data_report, repo, self.balance.summary() if self.balance is not None else None,
                                getattr(self.accelerator.unwrap_model(self.model).config, "reward_normalization", None),
                                getattr(self.model, "model_tags", None) or (), state=self.state,
                                datasets=self.dataset_names)

    def create_model_card(self, *args, **kwargs) -> None:
        if self.is_world_process_zero():
            self.write_card(self.args.output_dir, repo=self.hub_model_id)

    hub_files = staticmethod(hub_files)  # the files `push_to_hub` uploads (see `model_card.hub_files`)

    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, token: str | None = None,
                    revision: str | None = None, **kwargs):
        """Upload the model, tokenizer, card and plots (exactly `hub_files`) to `hub_model_id`."""
        from huggingface_hub import HfApi

        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card()
        return HfApi().upload_folder(
            repo_id=self.hub_model_id, folder_path=self.args.output_dir, commit_message=commit_message,
            token=token or self.args.hub_token, revision=revision or self.args.hub_revision,
            allow_patterns=self.hub_files(self.args.output_dir), run_as_future=not blocking,
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        texts, prepared = None, None  # an eval set's numbered texts (for the probes) and its prepared pairs
        if isinstance(eval_dataset, str):  # Trainer's name of one of several eval sets
            texts, prepared = self.run_data.probe_sets.get(eval_dataset), self.eval_dataset[eval_dataset]
        elif eval_dataset is None and not isinstance(self.eval_dataset, dict):
            texts, prepared = self.run_data.probe_sets.get("eval"), self.eval_dataset
        elif isinstance(eval_dataset, Dataset) and self.args.exploit_probes and has_pair_texts(eval_dataset):
            texts = eval_dataset = numbered(eval_dataset)
        if isinstance(eval_dataset, (Dataset, IterableDataset)):  # a dict: Trainer comes back here with each one
            eval_dataset = prepared = self.run_data.prepare(eval_dataset, metric_key_prefix)
        with reading_streams():
            metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.args.should_save and any(report.get("streamed") for report in self.data_report.values()):
            os.makedirs(self.args.output_dir, exist_ok=True)  # a streamed set's counts grew as it was read
            write_json_atomically(os.path.join(self.args.output_dir, "data_report.json"), self.data_report)
        if texts is not None and isinstance(prepared, Dataset) and ROW_COLUMN in prepared.column_names:
            metrics.update(self._probe_metrics(texts, sorted(prepared[ROW_COLUMN]), metric_key_prefix))
        return metrics

    def _probe_metrics(self, texts: Dataset, rows: list[int], prefix: str) -> dict[str, float]:
        """The exploit probes (see `probes.py`) on the eval pairs that were scored (`rows` of their texts), scored as
        a client scores them; logged as `<prefix>_probe_*`. Every process computes them on the whole set (no
        collectives), so all agree."""
        from .probes import exploit_probes, trainer_reward

        figures = exploit_probes(trainer_reward(self), *pair_texts(texts, rows, self.args.group_column), seed=self.args.seed)
        metrics = {f"{prefix}_{key}": value for key, value in figures.items()}
        self.log(metrics)
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
        """Check the shared-prompt layout on the model with the dataset's first two rows before a dataloader is built
        (`forward.decide_layout`): once per model, so every batch of the run is collated in the layout it keeps."""
        if self.layout.decided or not self.layout.shared_prompt or dataset is None:
            return
        if getattr(self.data_collator, "layout", None) is not self.layout:
            return  # a collator of the user's: it chooses its batches' layout
        if is_deepspeed_zero3_enabled():  # the weights are partitioned: no forward outside the engine
            self.layout.decided = True
            logger.warning("shared_prompt: the check of the packed layout against the plain one is skipped under "
                           "DeepSpeed ZeRO-3; set shared_prompt: false if this model's attention ignores custom masks.")
            return
        examples = list(dataset.take(2) if is_stream(dataset) else dataset.select(range(min(2, len(dataset)))))
        full_precision = not (self.args.bf16 or self.args.fp16) and self.model.dtype == torch.float32
        decide_layout(self.layout, self.model, examples, self.processing_class.pad_token_id, full_precision,
                      required=bool(self.args.shared_prompt))

    def _set_loss_options(self, args) -> None:
        """The options the loss function is called with: `loss_kwargs`, but none for the balanced loss (its balancer
        applies them) and never `learn_tie` (the trainer's); a list or tie loss is wrapped to take whole rows."""
        self.loss_options = {} if self.balance is not None else {
            k: v for k, v in args.loss_kwargs.items() if k != LEARN_TIE}
        self.list_loss = None if self.pairwise else as_list_loss(self.loss_fn, self.loss_options)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One loss per row (a pair, a list; see `row_losses`), then one weighted mean over the batch's rows."""
        rewards, off_prompt, features = self.score(model, inputs, model.training and self.length_head is not None)
        mask = inputs["list_mask"]
        pairs = list_pairs(rewards, inputs["ranks"], mask)
        center = self.args.center_rewards_coefficient * (2 * (rewards * mask).sum(-1) / mask.sum(-1)) ** 2 \
            if self.args.center_rewards_coefficient else None  # (r_c + r_r)^2 on a pair
        if self.pairwise:
            per_row, pair_losses, penalty = pairwise_row_losses(self.loss_fn, self.loss_options, pairs, inputs,
                                                                off_prompt, features, center, self.balance,
                                                                self.length_head, model.training)
        else:
            per_row, pair_losses, penalty = list_row_losses(self.list_loss, rewards, inputs, pairs, center, self.log_tie)
        weights = inputs.get("weight")
        weighted = per_row if weights is None else weights * per_row
        loss = weighted.mean() if penalty is None else weighted.mean() + penalty
        if model.training:
            self._micro_batches += 1
            if not all_finite(self.accelerator, loss, rewards[mask]):
                return self._non_finite(model, loss, rewards[mask])
            self.skip_steps.batch(loss)
            with torch.no_grad():
                self._record_train_step(pairs, pair_losses, inputs)
        return (loss, {"rewards": rewards, "losses": weighted}) if return_outputs else loss

    def _non_finite(self, model, loss, rewards):
        """Apply nan_policy to a batch whose loss or rewards are NaN or inf (the optimizer has not stepped yet)."""
        rewards = rewards.detach()
        accumulation = self.args.gradient_accumulation_steps
        where = (
            f"training step {self.state.global_step + 1}, micro-batch {(self._micro_batches - 1) % accumulation + 1} "
            f"of {accumulation} (loss {loss.item()}, {int((~torch.isfinite(rewards)).sum())} of {len(rewards)} "
            "rewards NaN or inf"
        )
        if self.args.nan_policy == "skip":
            self.skipped_batches += 1
            self.skip_steps.batch(None)
            logger.warning(f"Skipped a non-finite batch at {where}) (nan_policy=skip).")
            # Zero gradients for every trainable weight: the batch counts for nothing, accumulation stays in step (and
            # a step of skipped batches only does not run: `SkipEmptySteps`).
            return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)
        trial = getattr(self, "_trial", None)  # a trial of hyperparameter_search saves into its own folder
        self._save_checkpoint(self.model_wrapped, trial=trial)  # the weights are still the last good step's
        checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        raise TrainingStopped(
            f"non-finite loss or reward at {where}). Saved the last good state to {checkpoint}. Lower the learning "
            f"rate, check the data or use bf16 instead of fp16, then resume with --resume_from_checkpoint "
            f"{checkpoint}; or set nan_policy: skip to leave such batches out."
        )

    def _record_train_step(self, pairs, pair_losses, inputs):
        """Training accuracy, loss and reward scale over the batch's decisive pairs; group DRO's unit losses."""
        decisive = pairs.valid & ~pairs.tie
        group_ids = inputs.get("group_id")
        group_ids = None if group_ids is None else group_ids[:, None].expand_as(decisive)[decisive]
        chosen, rejected, losses = pairs.chosen[decisive], pairs.rejected[decisive], pair_losses[decisive]
        self.train_totals.add(chosen, rejected, losses, group_ids, len(self.group_names), inputs.get("text_tokens"))
        if group_ids is not None and self.balance is not None and self.balance.options.group_dro:
            lengths = inputs["response_lengths"]
            units = self.balance.unit_ids(group_ids, lengths.gather(1, pairs.better)[decisive],
                                          lengths.gather(1, pairs.worse)[decisive])
            self.unit_losses.add(units, losses, self.balance.num_units)
            if self.accelerator.sync_gradients:  # last micro-batch of this optimizer step
                self.balance.dro_update(*self.unit_losses.take())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.skip_steps.fix_logs(logs)  # the loss of the micro-batches that trained, not a skipped one's 0
        if self.model.training and self.train_totals.totals is not None:
            logs.update(self._train_metrics())
        if self.model.training and self.skipped_batches:
            logs["skipped_batches"] = self.skipped_batches
        super().log(logs, start_time)

    def _train_metrics(self) -> dict[str, float]:
        """Training metrics since the last log, summed over all processes."""
        metrics, group_accuracy = self.train_totals.take(self.group_names)
        if self.log_tie is not None:
            metrics["tie_parameter"] = self.log_tie.exp().item()
        metrics.update(group_accuracy)
        if self.balance is not None and self.balance.options.group_dro:
            for name, unit in self.balance.summary()["units"].items():
                metrics[f"unit_weight_{metric_name(name)}"] = unit["weight"]
        return metrics

    # --- evaluation --------------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        # Trainer pads K across batches with -100, so the mask travels as 1 / 0.
        group_ids = inputs.get("group_id", torch.zeros_like(outputs["losses"], dtype=torch.long))
        return (loss.detach(), (outputs["rewards"], outputs["losses"].detach()),
                (group_ids, inputs["ranks"], inputs["list_mask"].long(), inputs["response_lengths"]))

    def _reward_metrics(self, eval_prediction: EvalPrediction) -> dict[str, float]:
        (rewards, losses), (group_ids, ranks, mask, lengths) = real_pairs(eval_prediction)
        return reward_metrics(rewards, losses, group_ids, ranks, mask == 1, lengths, self.group_names or ["all"],
                              self.user_compute_metrics)
