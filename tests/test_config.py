import pytest

from hf_balanced_reward import BalancedRewardConfig, ConfigError


def make(**kwargs):
    return BalancedRewardConfig(output_dir="/tmp/unused", report_to="none", **kwargs)


def test_defaults_are_valid():
    config = make()
    assert config.loss_type == "bradley_terry" and config.loss_kwargs == {} and config.disable_dropout


def test_unknown_loss_lists_choices_and_nearest():
    with pytest.raises(ConfigError, match=r"loss_type='bradly_terry' is not a known loss \(did you mean "
                       r"'bradley_terry'\?\)\. Choose one of: balanced, bradley_terry, davidson, graded, hinge, pairwise, "
                       r"plackett_luce, rao_kupper\."):
        make(loss_type="bradly_terry")


def test_misspelled_loss_option_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown option 'hinge_margn' for loss 'hinge' \(did you mean "
                       r"'hinge_margin'\?\)\. Options of 'hinge': hinge_margin\."):
        make(loss_type="hinge", loss_kwargs={"hinge_margn": 0.5})


def test_option_of_another_loss_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown option 'hinge_margin' for loss 'bradley_terry'.*Options of "
                       r"'bradley_terry': none\."):
        make(loss_kwargs={"hinge_margin": 0.5})


def test_unknown_balance_weighting():
    with pytest.raises(ConfigError, match=r"weighting='cell' is not a weighting \(did you mean 'cells'\?\)\. "
                       r"Choose one of: cells, groups, none\."):
        make(loss_type="balanced", loss_kwargs={"weighting": "cell"})


def test_old_balance_method_option_names_the_new_ones():
    with pytest.raises(ConfigError, match=r"unknown option 'method' for loss 'balanced'.*Options of 'balanced': "
                       r"weighting, group_dro, dro_step_size, dro_adjustment, length_expert, length_head, cross_prompt, "
                       r"cross_prompt_partners\."):
        make(loss_type="balanced", loss_kwargs={"method": "group_dro"})


def test_negative_hinge_margin():
    with pytest.raises(ConfigError, match=r"hinge_margin must be >= 0, got -1"):
        make(loss_type="hinge", loss_kwargs={"hinge_margin": -1})


def test_negative_dro_step_size():
    with pytest.raises(ConfigError, match=r"dro_step_size must be a number >= 0, got -0.1"):
        make(loss_type="balanced", loss_kwargs={"group_dro": True, "dro_step_size": -0.1})


def test_loss_kwargs_from_a_json_string():
    config = make(loss_type="hinge", loss_kwargs='{"hinge_margin": 0.25}')
    assert config.loss_kwargs == {"hinge_margin": 0.25}


def test_loss_kwargs_bad_json():
    with pytest.raises(ConfigError, match=r"loss_kwargs must be a JSON object, got '\{hinge'"):
        make(loss_kwargs="{hinge")


def test_bad_max_length_and_centering():
    with pytest.raises(ConfigError, match=r"max_length must be at least 2"):
        make(max_length=1)
    with pytest.raises(ConfigError, match=r"center_rewards_coefficient must be >= 0, got -0.1"):
        make(center_rewards_coefficient=-0.1)


def test_options_that_would_fail_at_the_first_step_fail_here():
    with pytest.raises(ConfigError, match=r"loss_kwargs hinge_margin must be a number, got '1.0'; write it without "
                                          r"quotes, e.g. hinge_margin: 1.0\."):
        make(loss_type="hinge", loss_kwargs={"hinge_margin": "1.0"})
    with pytest.raises(ConfigError, match=r"learning_rate must be >= 0, got -0.001; a negative rate climbs the loss"):
        make(learning_rate=-1e-3)
    with pytest.raises(ConfigError, match=r"long_responses='trim' is not an option; choose one of: drop, cut"):
        make(long_responses="trim")
