import pytest

from hf_balanced_reward import BalancedRewardConfig, ConfigError


def make(**kwargs):
    return BalancedRewardConfig(output_dir="/tmp/unused", report_to="none", **kwargs)


def test_defaults_are_valid():
    config = make()
    assert config.loss_type == "bradley_terry" and config.loss_kwargs == {} and config.disable_dropout


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
